#!/usr/bin/env bash
# A 2-node Ray cluster on loopback: a head node and one worker node on 127.0.0.1, each its own
# raylet with its own ports, marked with a custom resource (learner_node_0 / learner_node_1).
# CPU accounting puts one RLlib learner on each node: the head offers 2 CPUs (trainer actor +
# one learner), the worker 1 CPU (one learner). Token authentication is on (ops/ray/env.sh).
# After starting, it checks that no Ray process listens on a wildcard address (all
# interfaces): only $RAY_NODE_IP. Stop with ops/ray/stop_cluster.sh.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,8p' "$0" | cut -c3-; exit 0; fi
. "$(dirname "$0")/env.sh"
HEAD_CPUS=${HEAD_CPUS:-2}
WORKER_CPUS=${WORKER_CPUS:-1}
ensure_ray_token

"$RAY" start --head --port "$RAY_PORT" --node-ip-address "$RAY_NODE_IP" \
  --temp-dir "$RAY_TMP" --num-cpus "$HEAD_CPUS" --num-gpus 0 \
  --resources '{"learner_node_0": 1}' --include-dashboard false \
  --node-manager-port 6391 --object-manager-port 6392 \
  --min-worker-port 11000 --max-worker-port 11499 \
  --dashboard-agent-listen-port 52365 --dashboard-agent-grpc-port 52366 \
  --metrics-export-port 52367 --runtime-env-agent-port 52368 \
  --ray-client-server-port 10001 --disable-usage-stats

"$RAY" start --address "$RAY_NODE_IP:$RAY_PORT" --node-ip-address "$RAY_NODE_IP" \
  --num-cpus "$WORKER_CPUS" --num-gpus 0 --resources '{"learner_node_1": 1}' \
  --node-manager-port 6393 --object-manager-port 6394 \
  --min-worker-port 11500 --max-worker-port 11999 \
  --dashboard-agent-listen-port 52375 --dashboard-agent-grpc-port 52376 \
  --metrics-export-port 52377 --runtime-env-agent-port 52378 --disable-usage-stats

"$RAY" status --address "$RAY_NODE_IP:$RAY_PORT"

# Which addresses the cluster's processes listen on: a wildcard one is reachable from the
# whole network, which the cluster was not told to do.
pids=$(pgrep -d, -f -- "$RAY_TMP" || true)
if [ -n "$pids" ] && command -v ss >/dev/null; then
  wide=$(ss -Hltnp 2>/dev/null | grep -E "pid=(${pids//,/|})," | awk '{print $4}' \
    | grep -E '^(\*|0\.0\.0\.0|\[::\]):' || true)
  if [ -n "$wide" ]; then
    echo "ray: WARNING: cluster processes listen on every interface: $(echo $wide)" >&2
    echo "ray: this Ray version ignores --node-ip-address for them; firewall those ports" >&2
  else
    echo "ray: every cluster port listens on $RAY_NODE_IP only"
  fi
fi
