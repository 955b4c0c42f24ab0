"""A private redis-server for one machine's fleet: tests, `fleet sim`, a single-box lab.

The server binds loopback only, never writes to disk (no RDB snapshots, no AOF) and lives
as long as its owner: `stop()` (or leaving the `with` block) ends it. A password, when
given, reaches redis-server through its stdin config rather than its command line, so it
does not show in `ps`.
"""

from __future__ import annotations

import collections
import logging
import re
import shutil
import socket
import subprocess
import threading
import time
from types import TracebackType
from urllib.parse import quote

from fleet.common.net import free_port

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
_INSTALL_HINT = "install redis-server: apt-get install redis-server"
_PORT_TRIES = 3  # an auto-chosen port can be taken between choosing and binding it


_PID_LINE = re.compile(rb"\r\nprocess_id:(\d+)\r\n")
_ERROR_LINE = re.compile(rb"(?:^|\r\n)-[^\r\n]*\r\n")


class RedisServerError(RuntimeError):
    """redis-server is missing, failed to start, or did not answer in time."""


def _config_quote(value: str) -> str:
    """A value for redis.conf: double-quoted, with backslash and quote escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _resp(*parts: str) -> bytes:
    """One command in the Redis wire protocol (RESP array of bulk strings)."""
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RedisServer:
    """A private redis-server on a loopback port: started, waited for, stopped; no disk writes."""

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        binary: str = "redis-server",
    ) -> None:
        self._fixed_port = port
        self.port = port or 0
        self.password = password
        self.binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=40)
        self._drain: threading.Thread | None = None

    @property
    def url(self) -> str:
        """redis://[:password@]127.0.0.1:port/0"""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Spawn redis-server and wait until it answers; returns self."""
        if self.running:
            return self
        path = shutil.which(self.binary)
        if path is None:
            raise RedisServerError(
                f"redis-server binary {self.binary!r} not found; {_INSTALL_HINT}"
            )
        deadline = time.monotonic() + timeout_s
        tries = 1 if self._fixed_port else _PORT_TRIES
        for attempt in range(1, tries + 1):
            self.port = self._fixed_port or free_port(HOST)
            self._spawn(path)
            try:
                self._wait_ready(deadline)
            except RedisServerError:
                output = "\n".join(self._output)
                self.stop()
                if attempt < tries and "Address already in use" in output:
                    log.info("port %d was taken before redis-server bound it; retrying", self.port)
                    continue
                raise
            log.info("redis-server running on %s:%d (pid %d)", HOST, self.port, self._proc.pid)
            return self
        raise AssertionError("unreachable")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the server (kill it if it does not exit in time). Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("redis-server pid %d ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait()
        if self._drain is not None:
            self._drain.join(timeout=1.0)
            self._drain = None
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------------

    def _spawn(self, path: str) -> None:
        args = [
            path, "-",  # "-": read more config from stdin (the password, if any)
            "--bind", HOST,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        config = f"requirepass {_config_quote(self.password)}\n" if self.password else ""
        self._output.clear()
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(config.encode())
            self._proc.stdin.close()
        except BrokenPipeError:
            pass  # it died at once; _wait_ready reports why
        # Keep reading the server's output so it can never block on a full pipe; the last
        # lines explain a failed start.
        self._drain = threading.Thread(
            target=self._read_output, args=(self._proc,), name="redis-output", daemon=True
        )
        self._drain.start()

    def _read_output(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            self._output.append(raw.decode(errors="replace").rstrip())

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        last_error = "no answer yet"
        while True:
            code = self._proc.poll()
            if code is not None:
                if self._drain is not None:
                    self._drain.join(timeout=1.0)
                tail = "\n".join(self._output) or "(no output)"
                raise RedisServerError(
                    f"redis-server exited with code {code} while starting on port {self.port}:\n"
                    f"{tail}"
                )
            try:
                if self._ping():
                    return
                last_error = "another process answered on the port, or an error"
            except OSError as exc:
                last_error = str(exc)
            if time.monotonic() > deadline:
                raise RedisServerError(
                    f"redis-server on port {self.port} did not answer in time "
                    f"({last_error}); output:\n" + ("\n".join(self._output) or "(no output)")
                )
            time.sleep(0.02)

    def _ping(self) -> bool:
        """True once *our* process answers: a server that already held the port must not
        pass for ours, so the reply's process_id has to be our child's pid."""
        assert self._proc is not None
        commands = [("AUTH", self.password)] if self.password else []
        commands.append(("INFO", "server"))
        with socket.create_connection((HOST, self.port), timeout=1.0) as sock:
            sock.sendall(b"".join(_resp(*c) for c in commands))
            reply = b""
            while True:
                found = _PID_LINE.search(reply)
                if found:
                    return int(found.group(1)) == self._proc.pid
                if _ERROR_LINE.search(reply):
                    return False
                data = sock.recv(65536)
                if not data:
                    return False
                reply += data
