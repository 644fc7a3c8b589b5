#!/usr/bin/env bash
# The GPU checks in one bounded run: every result lands in OUT_DIR as soon as its item ends.
#
#   benchmarks/gpu_suite.sh OUT_DIR            # on a CUDA machine (an H100/H200)
#   benchmarks/gpu_suite.sh OUT_DIR --dry-run  # on a CPU box: tiny shapes, same steps
#
# Items (each under its own time limit; a limit hit is reported, the suite goes on):
#   1. tests/gpu: the Triton and grouped_mm expert kernels vs float64 references, bf16 and fp32,
#      bitwise reruns; every measured error goes to kernel_errors.jsonl (runs beside item 4:
#      both barely use the GPU)
#   2. benchmarks/moe_kernels.py: permute, grouped GEMMs (fwd, dX, dW), SwiGLU and the whole
#      block per expert backend, vs torch._grouped_mm, torch.mm and a per-expert loop
#   3. benchmarks/model_step.py: one training step of the largest `small` cut that fits, bf16
#   4. benchmarks/gpu_service.py: jobs/train.py on one GPU worker (NCCL), an in-place abort and
#      rebuild of its process group, kill -9 and --resume
# summary.txt lists each item's exit status and seconds; OUT_DIR/logs.tgz keeps every log.
# Time limits can be scaled with GPU_SUITE_SCALE (e.g. 0.5 halves them); GPU_SUITE_ITEMS picks
# items by name (default: gpu_tests,gpu_service,moe_kernels,model_step).
set -uo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: $0 OUT_DIR [--dry-run]" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
DRY=0
[[ ${2:-} == --dry-run ]] && DRY=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
SCALE=${GPU_SUITE_SCALE:-1}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
cd "$ROOT" || exit 2

limit() {  # seconds for an item, scaled
    "$PY" -c "import sys; print(max(10, int(float(sys.argv[1]) * float(sys.argv[2]))))" "$1" "$SCALE"
}

run_item() {  # name seconds command...: run bounded, log to WORK/name.log, note the outcome
    local name=$1 seconds
    if [[ ",${GPU_SUITE_ITEMS:-gpu_tests,gpu_service,moe_kernels,model_step}," != *",$name,"* ]]; then
        echo "   $name: not selected (GPU_SUITE_ITEMS)" >>"$OUT/summary.txt"
        return 0
    fi
    seconds=$(limit "$2")
    shift 2
    local started=$SECONDS
    echo "== $name (limit ${seconds}s): $*" | tee -a "$OUT/summary.txt"
    timeout --kill-after=15 "$seconds" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    local verdict=ok
    [[ $rc -ne 0 ]] && verdict="FAILED rc=$rc"
    [[ $rc -eq 124 || $rc -eq 137 ]] && verdict="TIME LIMIT (${seconds}s)"
    echo "   $name: $verdict in $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$WORK/$name.log" | sed 's/^/   | /' >>"$OUT/summary.txt"
    pack_logs
}

pack_logs() {  # the items' logs and reports, not their checkpoints or data (16 MiB a file)
    (cd "$WORK" && find . -type f \( -name '*.log' -o -name '*.md' -o -name '*.json' \
        -o -name '*.jsonl' -o -name '*.txt' \) -size -4M -print0 |
        tar -czf "$OUT/logs.tgz" --null -T -) 2>/dev/null
}

{
    echo "# gpu_suite $(date -u +%FT%TZ) dry_run=$DRY"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
} >>"$OUT/summary.txt" 2>&1

if [[ $DRY -eq 1 ]]; then
    # the interpreter stands in for the GPU; tests/gpu then skips, so the grouped_mm CPU tests and
    # one interpreter kernel test stand in for item 1
    export TRITON_INTERPRET=1
    run_item gpu_tests 300 "$PY" -m pytest -q -x tests/gpu tests/unit/test_kernels_grouped.py \
        tests/integration/test_abort_communicators.py &
    run_item gpu_service 600 "$PY" benchmarks/gpu_service.py --dry-run --out "$WORK/service" \
        --time-limit-s "$(limit 500)"
    wait
    run_item moe_kernels 300 "$PY" benchmarks/moe_kernels.py --dry-run --out "$OUT/moe_kernels.md"
    run_item model_step 300 "$PY" benchmarks/model_step.py --dry-run --out "$WORK/step" \
        --time-limit-s "$(limit 240)"
else
    ELASTIC_MOE_KERNEL_ERRORS="$OUT/kernel_errors.jsonl" \
        run_item gpu_tests 170 "$PY" -m pytest -q -rA tests/gpu &
    run_item gpu_service 200 "$PY" benchmarks/gpu_service.py --out "$WORK/service" \
        --time-limit-s "$(limit 185)"
    wait
    run_item moe_kernels 200 "$PY" benchmarks/moe_kernels.py --out "$OUT/moe_kernels.md" \
        --time-limit-s "$(limit 120)"
    run_item model_step 170 "$PY" benchmarks/model_step.py --configs small \
        --expert-backend auto grouped_mm --out "$WORK/step" --time-limit-s "$(limit 155)"
fi
# the two helper scripts' main results next to the others (at most 8 files come back)
for dir in service step; do
    for f in "$WORK/$dir"/*.md; do
        [[ -e $f ]] && cat "$f" >>"$OUT/$dir.md"
    done
done
pack_logs
grep -E "^   [a-z_]+: " "$OUT/summary.txt"
