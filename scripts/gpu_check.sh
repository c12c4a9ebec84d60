#!/usr/bin/env bash
# Every check that needs a CUDA GPU, on a machine that already has PyTorch with CUDA.
#
#   bash scripts/gpu_check.sh OUT_DIR [STEP ...]      # all steps when none is named
#
# Steps: env gpu_tests layer_bench train_bench compile_bench nccl demo suite.
# Each step's output goes to OUT_DIR/<step>.log; a table of exit codes and times ends the
# run, followed by each benchmark's JSON line. Exits 1 if any step failed. PYTHON names the interpreter (default
# python3); the repository is put on PYTHONPATH, so nothing needs installing.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:?usage: gpu_check.sh OUT_DIR [STEP ...]}"
shift
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(env gpu_tests layer_bench train_bench compile_bench nccl demo suite)
py="${PYTHON:-python3}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$root"

step_env() {
    nvidia-smi || return
    "$py" -c 'import torch, sys
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())' || return
    "$py" -m pip list 2>/dev/null | grep -i -E "^(transformers|safetensors|matplotlib|tokenizers|pytest|triton) "
    return 0
}
step_gpu_tests() { "$py" -m pytest tests -m gpu -q -p no:cacheprovider; }
step_layer_bench() { "$py" benchmarks/bench_layer_cuda.py; }
step_train_bench() { "$py" benchmarks/bench_train.py --device cuda --shapes 16x256,64x256; }
step_compile_bench() {
    "$py" benchmarks/bench_train.py --device cuda --shapes 16x256,64x256 --compile reduce-overhead
}
step_nccl() {
    # Expert parallelism over NCCL, one rank per GPU, against the whole layer on one GPU.
    # (`moekit train --expert-parallel 1` would run without a process group.)
    local gpus  # as this process sees them (CUDA_VISIBLE_DEVICES, MIG)
    gpus="$("$py" -c 'import torch; print(torch.cuda.device_count())')" || return
    [ "$gpus" -gt 0 ] || { echo "no CUDA device"; return 1; }
    "$py" -m torch.distributed.run --standalone --nproc-per-node "$gpus" scripts/nccl_check.py
}
step_demo() { "$py" -m moekit demo --run-dir "$work/demo" --no-progress; }
step_suite() { "$py" -m pytest tests -q -p no:cacheprovider --timeout 300; }

summary=()
failed=0
for step in "${steps[@]}"; do
    if ! declare -F "step_$step" >/dev/null; then
        echo "unknown step: $step" >&2
        exit 2
    fi
    echo "=== $step"
    start=$SECONDS
    "step_$step" >"$out/$step.log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || failed=1
    tail -n 5 "$out/$step.log"
    summary+=("$(printf '%-14s rc %-3s %5ss' "$step" "$rc" "$((SECONDS - start))")")
done
echo "=== summary"
printf '%s\n' "${summary[@]}"
grep -h "^{" "$out"/*.log 2>/dev/null
rm -rf "$work"
exit "$failed"
