#!/usr/bin/env bash
# A real two-node Ray cluster on loopback runs `nas run --address` to the end.
#
#     bash benchmarks/ray_cluster.sh [RUN_DIR]
#
# Two raylets on this machine (one CPU each) form the cluster; the search's evaluators are spread over both
# nodes (trials.csv names the Ray node of each evaluation) while the driver measures latency. RUN_DIR (default
# runs/cluster) may already hold a trained run, which is reused. Ray 2.60 starts clusters with token
# authentication: every node and the driver read the token from ~/.ray/auth_token with RAY_AUTH_MODE=token
# (copy that file to the other machines of a real cluster).
set -euo pipefail
run_dir=${1:-runs/cluster}
export RAY_AUTH_MODE=token
ray stop --force >/dev/null 2>&1 || true
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
ray start --head --port=6379 --num-cpus=1 --include-dashboard=false --disable-usage-stats
ray start --address=127.0.0.1:6379 --num-cpus=1 --disable-usage-stats
ray status
nas run digits_quick --out "$run_dir" --address 127.0.0.1:6379 --workers 2 --trials 12
cut -d, -f1,2,3,4,15 "$run_dir/trials.csv"
