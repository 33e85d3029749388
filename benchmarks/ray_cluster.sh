#!/usr/bin/env bash
# The two-node loopback cluster of examples/ray_cluster/run.sh on the quickstart space, with the node of each
# evaluation printed (benchmarks/README.md records the result).
#
#     bash benchmarks/ray_cluster.sh [RUN_DIR]
set -euo pipefail
run_dir=${1:-runs/cluster}
bash "$(dirname "$0")/../examples/ray_cluster/run.sh" "$run_dir" digits_quick 12
cut -d, -f1,2,3,4,15 "$run_dir/trials.csv"
