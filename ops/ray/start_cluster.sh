#!/usr/bin/env bash
# A 2-node Ray cluster on loopback: a head node and one worker node on 127.0.0.1, each its own
# raylet with its own ports, marked with a custom resource (learner_node_0 / learner_node_1).
# CPU accounting puts one RLlib learner on each node: the head offers 2 CPUs (trainer actor +
# one learner), the worker 1 CPU (one learner). Stop with ops/ray/stop_cluster.sh.
set -euo pipefail
RAY=${RAY:-.venv/bin/ray}
PORT=${RAY_PORT:-6390}
HEAD_CPUS=${HEAD_CPUS:-2}
WORKER_CPUS=${WORKER_CPUS:-1}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}  # loopback only; a real cluster keeps tokens

"$RAY" start --head --port "$PORT" --node-ip-address 127.0.0.1 \
  --temp-dir "${RAY_TMP:-/tmp/ray-fleet}" --num-cpus "$HEAD_CPUS" --num-gpus 0 \
  --resources '{"learner_node_0": 1}' --include-dashboard false \
  --node-manager-port 6391 --object-manager-port 6392 \
  --min-worker-port 11000 --max-worker-port 11499 \
  --dashboard-agent-listen-port 52365 --dashboard-agent-grpc-port 52366 \
  --metrics-export-port 52367 --runtime-env-agent-port 52368 \
  --ray-client-server-port 10001 --disable-usage-stats

"$RAY" start --address "127.0.0.1:$PORT" --node-ip-address 127.0.0.1 \
  --num-cpus "$WORKER_CPUS" --num-gpus 0 --resources '{"learner_node_1": 1}' \
  --node-manager-port 6393 --object-manager-port 6394 \
  --min-worker-port 11500 --max-worker-port 11999 \
  --dashboard-agent-listen-port 52375 --dashboard-agent-grpc-port 52376 \
  --metrics-export-port 52377 --runtime-env-agent-port 52378 --disable-usage-stats

"$RAY" status --address "127.0.0.1:$PORT"
