"""Make a lab CA, a learner server certificate and one client certificate per cell.

Lab use only: the CA key stays in the output directory next to the certificates, so keep
that directory private (it is written 0700, keys 0600). Re-running adds missing cells and
keeps an existing CA, so cells already deployed stay valid.

    python ops/make_certs.py --out DIR --learner-host 127.0.0.1 --cells cell-01,cell-02
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_FILE, CA_KEY = "ca.pem", "ca.key"
LEARNER = "learner"
VALID_DAYS = 825

Key = ec.EllipticCurvePrivateKey


def _new_key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: Key) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetlearn lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _builder(subject: x509.Name, issuer: x509.Name, key: Key) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
    )


def make_ca(out: Path, name: str = "fleetlearn lab CA") -> tuple[x509.Certificate, Key]:
    """Load the CA in `out`, or make one."""
    cert_path, key_path = out / CA_FILE, out / CA_KEY
    if cert_path.is_file() and key_path.is_file():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key
    key = _new_key()
    subject = _name(name)
    cert = (
        _builder(subject, subject, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert, key


def _leaf(
    out: Path,
    stem: str,
    cn: str,
    ca: tuple[x509.Certificate, Key],
    *,
    server_hosts: Sequence[str] = (),
) -> Path:
    ca_cert, ca_key = ca
    key = _new_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(_name(cn), ca_cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    sans: list[x509.GeneralName] = []
    for host in server_hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    if not server_hosts:
        sans.append(x509.DNSName(cn))
    builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(out / f"{stem}.key", key)
    _write_cert(out / f"{stem}.pem", cert)
    return out / f"{stem}.pem"


def make_certs(
    out: Path, learner_hosts: Sequence[str], cells: Sequence[str], *, overwrite: bool = False
) -> list[Path]:
    """The CA (kept if present), the learner's certificate and one per cell; returns paths."""
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    ca = make_ca(out)
    hosts = list(dict.fromkeys([*learner_hosts, "127.0.0.1", "localhost"]))
    made = [_leaf(out, LEARNER, LEARNER, ca, server_hosts=hosts)]
    for cell in cells:
        if not overwrite and (out / f"{cell}.pem").is_file():
            continue
        made.append(_leaf(out, cell, cell, ca))
    return made


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the PEM files")
    p.add_argument(
        "--learner-host",
        action="append",
        default=[],
        help="name or IP cells dial the learner by (repeatable); localhost is always added",
    )
    p.add_argument("--cells", default="", help="comma-separated cell ids")
    p.add_argument("--overwrite", action="store_true", help="remake existing cell certificates")
    args = p.parse_args(argv)
    cells = [c for c in args.cells.split(",") if c]
    hosts = [h for arg in args.learner_host for h in arg.split(",") if h]
    for path in make_certs(args.out, hosts, cells, overwrite=args.overwrite):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
