#!/usr/bin/env bash
# The GPU figures of docs/speed.md and of hydra/launcher=gpus (docs/sweeps.md), in two calls of at
# most 5 minutes each on an H100/H200. Here, once, with pip's package index reachable:
#
#   bash benchmarks/gpu_check.sh --prepare
#
# then on the GPU machine (device run, carry [".whl", ".gpu-data"], timeout_s 400), one call each:
#
#   bash benchmarks/gpu_check.sh 1   # gpu.py eager and compile=true at batch 64 and 512; experiment=fast, 3 seeds
#   bash benchmarks/gpu_check.sh 2   # README's command, fixed_cost.py, the 12-job sweep: sequential, 6 and 12 at once
#
# Each ends with the table of every GPU target beside its measured value (benchmarks/gpu_targets.py),
# also in $OUT/gpu_check-<part>.log. Every step runs under its own timeout, unbuffered, in a new
# folder. `--device cpu 1` (or 2) runs the same steps, shortened, on a CPU: to check the script.
#
# --prepare writes the wheels of what the GPU image lacks into .whl/ (the versions the project's
# Python runs: $PYTHON, else .venv/bin/python, else an active venv's; --device cpu uses the same) and a gzip copy of MNIST/raw into .gpu-data/ (both
# git-ignored). On the GPU machine the script installs the wheels into /tmp/site and unpacks the data.
set -uo pipefail
cd "$(dirname "$0")/.."

# The project's Python, here: $PYTHON, else .venv/bin/python, else the python on PATH (an active venv's).
project_python() {
  python="${PYTHON:-}"
  [ -z "$python" ] && [ -x .venv/bin/python ] && python=.venv/bin/python
  [ -z "$python" ] && python=$(command -v python || command -v python3)
  if ! "$python" -c "import hydra, omegaconf, mnist_lab" 2>/dev/null; then
    echo "Error: $python cannot import hydra, omegaconf and mnist_lab: install the project (pip install -e .) in .venv or an active venv, or set PYTHON=<a python that has it>" >&2
    exit 1
  fi
}

if [ "${1:-}" = "--prepare" ]; then
  set -e
  project_python
  data="${MNIST_LAB_DATA:-$(cd .. && pwd)/shared/datasets}"
  if ! ls "$data"/MNIST/raw/*-ubyte >/dev/null 2>&1; then
    echo "Error: no MNIST/raw/*-ubyte under $data: set MNIST_LAB_DATA to the folder that holds MNIST/raw" >&2
    exit 1
  fi
  rm -rf .whl .gpu-data && mkdir -p .whl .gpu-data/MNIST/raw
  # Pure-Python wheels of what the GPU image lacks (antlr4's only release is a source archive: pip
  # builds its wheel). The image has torch, Lightning, TensorBoard, matplotlib, joblib and cloudpickle.
  versions=$("$python" -c "
from importlib.metadata import version
print(' '.join(f'{name}=={version(name)}' for name in ('hydra-core', 'omegaconf', 'hydra-joblib-launcher', 'antlr4-python3-runtime')))")
  "$python" -m pip wheel -q --no-deps -w .whl $versions
  for f in "$data"/MNIST/raw/*-ubyte; do gzip -c "$f" > ".gpu-data/MNIST/raw/$(basename "$f").gz"; done
  ls -la .whl .gpu-data/MNIST/raw
  exit 0
fi

device=cuda
if [ "${1:-}" = "--device" ]; then device="${2:-}"; shift; [ $# -gt 0 ] && shift; fi
part="${1:-}"
if { [ "$device" != cuda ] && [ "$device" != cpu ]; } || { [ "$part" != 1 ] && [ "$part" != 2 ]; }; then
  echo "usage: bash benchmarks/gpu_check.sh [--prepare | [--device cpu] 1 | [--device cpu] 2]" >&2
  exit 2
fi

export PYTHONUNBUFFERED=1
if [ "$device" = cuda ]; then
  [ -d .whl ] || { echo "Error: no .whl/: run bash benchmarks/gpu_check.sh --prepare here first, and carry .whl and .gpu-data" >&2; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  mkdir -p /tmp/data/MNIST/raw
  for f in .gpu-data/MNIST/raw/*.gz; do gunzip -c "$f" > "/tmp/data/MNIST/raw/$(basename "$f" .gz)"; done
  export MNIST_LAB_DATA=/tmp/data
  python="python3"
  # The figures as measured: 5 epochs of gpu.py, the whole 12-job sweep.
  gpu=(); gpu_overrides=(); short=(); sweep=(--jobs-per-gpu 6 12); sweep_overrides=()
else
  project_python
  export PYTHONPATH=$PWD
  export MNIST_LAB_DATA="${MNIST_LAB_DATA:-$(cd .. && pwd)/shared/datasets}"
  # A few batches of everything: the steps run, the figures mean nothing.
  gpu=(--device cpu --epochs 1); gpu_overrides=(+trainer.limit_train_batches=20)
  short=(trainer=cpu +trainer.limit_train_batches=3 +trainer.limit_val_batches=2 +trainer.limit_test_batches=2)
  sweep=(--jobs-per-gpu 2); sweep_overrides=(trainer=cpu data.on_device=false optimizer.lr=0.05,0.1 data.batch_size=64
    trainer.max_epochs=1 +trainer.limit_train_batches=3 +trainer.limit_val_batches=2 +trainer.limit_test_batches=2)
fi
results=$(mktemp -d "/tmp/gpu_check-$part.XXXX")  # new folders each call: no run is refused as finished
log="${OUT:-$results}/gpu_check-$part.log"
quiet=(callbacks.progress_bar=null +trainer.enable_progress_bar=false)

# step SECONDS NAME COMMAND...: the command under its own timeout, its lines as they come.
step() {
  local limit="$1" name="$2"; shift 2
  echo; echo "### $name"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | grep --line-buffered -v -e "it/s]" -e "^\s*$"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "!!! $name: stopped at its ${limit} s limit"
  elif [ "$rc" != 0 ]; then echo "!!! $name: failed (exit status $rc)"; fi
  echo "(${name}: $((SECONDS - start)) s)"
}

{
  echo "gpu_check part $part on $device, results in $results"
  [ "$device" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$python" -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)"
  if [ "$part" = 1 ]; then
    # The limits, with the install, add up to 5 minutes; each is about twice the step's expected time.
    for b in 64 512; do
      lr=(); limit=(65 55); [ "$b" = 512 ] && lr=(optimizer.lr=0.2) && limit=(40 40)
      step "${limit[0]}" "gpu.py batch $b" "$python" benchmarks/gpu.py "${gpu[@]}" --json "$results/gpu-b$b.json" -- \
        "${gpu_overrides[@]}" "${quiet[@]}" data.batch_size=$b "${lr[@]}"
      step "${limit[1]}" "gpu.py batch $b compile=true" "$python" benchmarks/gpu.py "${gpu[@]}" \
        --json "$results/gpu-b$b-compile.json" -- "${gpu_overrides[@]}" "${quiet[@]}" data.batch_size=$b "${lr[@]}" compile=true
    done
    for seed in 1 2 3; do
      step 25 "experiment=fast seed=$seed" "$python" train.py experiment=fast seed=$seed "${quiet[@]}" "${short[@]}" \
        hydra.run.dir="$results/fast-seed$seed"
      "$python" -c "import json; m = json.load(open('$results/fast-seed$seed/metrics.json')); print('experiment=fast seed=$seed:', m['test/acc'], 'training s', round(sum(m['epoch_train_time_s']), 3), m['epoch_train_time_s'], 'capture s', m.get('capture_time_s'))" 2>/dev/null
    done
  else
    # As in part 1, the limits add up to 5 minutes; the sweep writes each arm's figures as it ends.
    start=$(date +%s.%N)
    step 60 "README's command, the whole process" "$python" train.py model=lenet trainer.max_epochs=5 "${quiet[@]}" \
      "${short[@]}" hydra.run.dir="$results/readme"
    "$python" -c "print(round($(date +%s.%N) - $start, 2))" > "$results/readme.wall"
    echo "$(cat "$results/readme.wall") s for the whole process"
    step 45 "fixed_cost.py" "$python" benchmarks/fixed_cost.py --repeats 1 --json "$results/fixed_cost.json"
    step 170 "the 12-job sweep: sequential, 6 and 12 at once" "$python" benchmarks/sweep_concurrency.py \
      --json "$results/sweep.json" "${sweep[@]}" -- "${sweep_overrides[@]}"
  fi
  echo; echo "### every GPU target (part $part measures its own; the other part's read 'not measured')"
  "$python" benchmarks/gpu_targets.py "$results"
} 2>&1 | tee "$log"
