#!/usr/bin/env bash
# The merging benchmark's GPU rows (issue #19): every row at batch 32 and 128 under bf16 autocast, without and
# with torch.compile, one JSON table per setting in benchmarks/results/. Extra options go to bench_merging.py,
# e.g. `benchmarks/gpu_rows.sh --rows biomedclip-base:full biomedclip-base:lora` to fit a short GPU lease.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
for batch in 32 128; do
  for compile in "" --compile; do
    "$python" benchmarks/bench_merging.py --device cuda --bf16 $compile --batch-size "$batch" \
      --repeats 5 --min-time 0.5 "$@"
  done
done
# The ways to merge K task vectors against their floor (#37), at the tiny models' sizes and ViT-B/16's (149,620,737).
"$python" benchmarks/bench_merge_passes.py --device cuda --inductor --floats 3379009 1320641 149620737
