#!/usr/bin/env bash
# The central learner on the loopback cluster with one RLlib learner process per node
# (--num-learners 2; DDP over gloo on CPU). Extra arguments go to learner.main.
# Usage: ops/ray/run_learner.sh --redis-url redis://127.0.0.1:6379/0 --data-dir /tmp/fleet \
#          --tasks pick_cube,touch_target --cameras overhead,wrist_left --insecure
# (--insecure: plaintext, any cell; a lab gives --tls-dir DIR --mtls --tokens-file FILE)
set -euo pipefail
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec .venv/bin/python -m learner.main --ray-address "127.0.0.1:${RAY_PORT:-6390}" \
  --num-learners 2 "$@"
