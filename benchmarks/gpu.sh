#!/usr/bin/env bash
# GPU benchmark (one H100/H200, ~8 minutes): SiT-B/2 and SiT-XL/2 training and sampling
# throughput in bf16, dense vs routed, CFG vs SG, eager and compiled (trainer.compile's path),
# with MFU and realised-saving columns. Needs only PyTorch, numpy and rich.
#
#   bash benchmarks/gpu.sh                 # from anywhere; results in $OUT or benchmarks/results/gpu.json
#   bash benchmarks/gpu.sh --smoke         # tiny sizes, any device
#   bash benchmarks/gpu.sh --no-compile    # eager rows only (~2 minutes)
#   bash benchmarks/gpu.sh --compile-mode reduce-overhead   # compiled rows with CUDA graphs
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
fi
PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} exec "$PYTHON" -u -m benchmarks.gpu "$@"
