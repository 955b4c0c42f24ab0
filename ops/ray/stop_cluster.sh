#!/usr/bin/env bash
# Stops only the Ray nodes that ops/ray/start_cluster.sh started (their processes name its temp
# dir or GCS port), by pid. `ray stop` would also end every other Ray instance on the machine.
set -uo pipefail
TMP=${RAY_TMP:-/tmp/ray-fleet}
PORT=${RAY_PORT:-6390}
pids=$(ps -eo pid=,args= | awk -v t="$TMP" -v p=":$PORT" 'index($0, t) || index($0, p) {print $1}')
[ -z "$pids" ] && { echo "no loopback cluster running"; exit 0; }
kids=$(for p in $pids; do pgrep -P "$p"; done)
kill $kids $pids 2>/dev/null
sleep 5
kill -9 $kids $pids 2>/dev/null
echo "stopped: $pids $kids"
