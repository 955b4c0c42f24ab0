"""Make the learner's policy signing key pair: `python ops/make_signing_key.py --out DIR`.

The private key (mode 0600) stays on the learner (`fleet learner --signing-key`); the public
key goes to every cell (`fleet actor --verify-key`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleet.common.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, write_key_pair


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write an Ed25519 policy signing key pair.")
    p.add_argument("--out", type=Path, required=True, help="directory for the two PEM files")
    args = p.parse_args(argv)
    existing = [
        args.out / n for n in (PRIVATE_KEY_NAME, PUBLIC_KEY_NAME) if (args.out / n).exists()
    ]
    if existing:
        print(f"refusing to overwrite {', '.join(map(str, existing))}", file=sys.stderr)
        return 1
    private, public = write_key_pair(args.out)
    print(f"private key (learner only, mode 0600): {private}")
    print(f"public key (every cell): {public}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
