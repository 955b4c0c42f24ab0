#!/usr/bin/env bash
# The central learner on the loopback cluster with one RLlib learner process per node
# (--num-learners 2; DDP over gloo on CPU). Extra arguments go to learner.main.
# Without --redis-url it starts a private Redis on 127.0.0.1 (password in a 0600 file under
# var/ray/, stopped when the learner stops) and says where it is.
# Usage: ops/ray/run_learner.sh --data-dir /tmp/fleet \
#          --tasks pick_cube,touch_target --cameras overhead,front --insecure [--redis-url URL]
# (--insecure: plaintext, any cell; a lab gives --tls-dir DIR --mtls --tokens-file FILE)
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,8p' "$0" | cut -c3-; exit 0; fi
. "$(dirname "$0")/env.sh"
args=("$@")
redis_pid=""
if [[ " $* " != *" --redis-url "* && " $* " != *" --redis-url="* ]]; then
  port=${REDIS_PORT:-6380}
  mkdir -p "$RAY_SECRETS" && chmod 700 "$RAY_SECRETS"
  pw=$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(16))')
  # The password goes in on stdin, never on a command line other users can read.
  printf 'port %s\nbind 127.0.0.1\nrequirepass %s\nsave ""\nappendonly no\n' "$port" "$pw" \
    | redis-server - >"$RAY_SECRETS/redis.log" 2>&1 &
  redis_pid=$!
  trap 'kill $redis_pid 2>/dev/null' EXIT
  url="redis://:$pw@127.0.0.1:$port/0"
  (umask 077 && printf '%s\n' "$url" > "$RAY_SECRETS/redis_url")
  for _ in $(seq 100); do
    REDISCLI_AUTH="$pw" redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && break
    kill -0 "$redis_pid" 2>/dev/null || { cat "$RAY_SECRETS/redis.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "run_learner: private Redis on 127.0.0.1:$port; its URL is in $RAY_SECRETS/redis_url (0600)"
  args+=(--redis-url "$url")
fi
.venv/bin/python -m learner.main --ray-address "$RAY_NODE_IP:$RAY_PORT" --num-learners 2 "${args[@]}"
