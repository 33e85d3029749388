#!/usr/bin/env bash
# A two-node Ray cluster (both nodes on this machine, over loopback) trains a supernet and runs a search to the end.
#
#     bash examples/ray_cluster/run.sh [RUN_DIR] [SPACE] [TRIALS]     (defaults: runs/cluster digits_quick 12)
#
# Two raylets with one CPU each form the cluster; `nas run --address --workers 2` trains with one Ray Train worker on
# each node (data-parallel, see the README's "Training across workers"), then spreads the search's evaluators over both
# (trials.csv names the Ray node of each evaluation) while the driver measures latency on this machine. On a real
# cluster run the second `ray start` on the other machine with the head's address. Ray 2.60 starts clusters with
# token authentication: every node and the driver read ~/.ray/auth_token with RAY_AUTH_MODE=token (copy that file
# to the other machines). Each node needs nasforge installed. The search needs no shared file system; the training
# (also on both nodes) needs RUN_DIR at the same path on every node, which holds on one machine.
set -euo pipefail
run_dir=${1:-runs/cluster}
space=${2:-digits_quick}
trials=${3:-12}
port=${NASFORGE_RAY_PORT:-6379}
export RAY_AUTH_MODE=token
ray stop --force >/dev/null 2>&1 || true
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
ray start --head --port="$port" --num-cpus=1 --include-dashboard=false --disable-usage-stats
ray start --address="127.0.0.1:$port" --num-cpus=1 --disable-usage-stats
ray status
nas run "$space" --out "$run_dir" --address "127.0.0.1:$port" --workers 2 --trials "$trials" --no-int8
