#!/usr/bin/env bash
# The GPU checks of the kernels in one go, on a lent CUDA machine with torch and Triton and
# nothing installed from this repo: the kernel tests compiled on CUDA, then the kernel
# benchmarks with --device cuda. Logs and CSVs go to the folder given as $1 (default gpu-out).
# PARTS picks and orders the steps (default: "tests attention ffn train_step"); TESTS,
# ATTN_ARGS and STEP_ARGS narrow them, *_TIMEOUT bound them.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# structprune.kernels lives in kernels/ (setup.py's package_dir mapping): lay the package out
# as installed in a scratch folder and import it from there.
site=$(mktemp -d)
cp -r structprune "$site/structprune"
cp -r kernels "$site/structprune/kernels"
export PYTHONPATH="$site"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
for part in ${PARTS:-tests attention ffn train_step}; do
  case $part in
    tests) STRUCTPRUNE_TRITON_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -v -p no:cacheprovider \
             -o pythonpath="$site" ${TESTS:-tests/test_kernels_masked_attention.py tests/test_kernels_gated_ffn.py} \
             > "$out/tests.log" 2>&1; grep -cE "PASSED" "$out/tests.log"; grep -E "FAILED|ERROR|passed|failed" "$out/tests.log" | tail -15 ;;
    attention) timeout "${ATTN_TIMEOUT:-300}" python3 benchmarks/bench_attention.py --device cuda \
                 --csv "$out/attention.csv" ${ATTN_ARGS:-} 2>&1 | tee "$out/attention.log" ;;
    ffn) timeout "${FFN_TIMEOUT:-90}" python3 benchmarks/bench_ffn.py --device cuda --csv "$out/ffn.csv" 2>&1 | tee "$out/ffn.log" ;;
    train_step) timeout "${STEP_TIMEOUT:-90}" python3 benchmarks/bench_train_step.py --device cuda \
                  --csv "$out/train_step.csv" ${STEP_ARGS:-} 2>&1 | tee "$out/train_step.log" ;;
  esac
done
