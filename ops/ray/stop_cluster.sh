#!/usr/bin/env bash
# Stops only the Ray nodes that ops/ray/start_cluster.sh started (their processes name its temp
# dir or GCS port), by pid. `ray stop` would also end every other Ray instance on the machine.
# pgrep never lists itself, so this script's own search does not count as a running node.
set -uo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,4p' "$0" | cut -c3-; exit 0; fi
. "$(dirname "$0")/env.sh"
pids=$(pgrep -f -- "$RAY_TMP|--port[= ]$RAY_PORT( |$)|:$RAY_PORT( |$)" | grep -vx "$$" || true)
if [ -z "$pids" ]; then
  echo "no loopback cluster running"
  exit 0
fi
kids=$(for p in $pids; do pgrep -P "$p"; done)
kill $kids $pids 2>/dev/null
for _ in $(seq 50); do  # up to 5 s for a clean exit
  alive=$(for p in $kids $pids; do kill -0 "$p" 2>/dev/null && echo "$p"; done)
  [ -z "$alive" ] && break
  sleep 0.1
done
[ -n "${alive:-}" ] && kill -9 $alive 2>/dev/null
echo "stopped:" $pids $kids
