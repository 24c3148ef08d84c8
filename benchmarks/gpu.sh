#!/usr/bin/env bash
# GPU benchmark (one H100/H200, ~4-5 minutes): SiT-B/2 and SiT-XL/2 training and sampling
# throughput in bf16, dense vs routed, CFG vs SG. Needs only PyTorch, numpy and rich.
#
#   bash benchmarks/gpu.sh                 # from anywhere; results in $OUT or benchmarks/results/gpu.json
#   bash benchmarks/gpu.sh --smoke         # tiny sizes, any device
#   bash benchmarks/gpu.sh --budget-s 400  # let the optional torch.compile section run
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
fi
PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} exec "$PYTHON" -u -m benchmarks.gpu "$@"
