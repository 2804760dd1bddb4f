#!/usr/bin/env bash
# The GPU figures of docs/speed.md and of hydra/launcher=gpus (docs/sweeps.md), in one run on a
# lent GPU machine (about 7 minutes on an H100/H200). From this machine, after `bash benchmarks/gpu_check.sh --prepare` once:
#
#   device run, carry [".whl", ".gpu-data"], timeout_s 600, command:
#     bash benchmarks/gpu_check.sh
#
# --prepare (here, with the internet's package index reachable through pip) downloads the wheels
# the GPU image lacks into .whl/ and puts a gzip copy of MNIST/raw into .gpu-data/ (both
# git-ignored). On the GPU machine the script installs the wheels, unpacks the data, and writes
# every figure to $OUT/gpu_check.log (and to the console).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  set -e
  data="${MNIST_LAB_DATA:-$(cd .. && pwd)/shared/datasets}"
  mkdir -p .whl .gpu-data/MNIST/raw
  # Pure-Python wheels (antlr4's only release is a source archive: pip builds its wheel), the
  # versions this project's virtual environment runs.
  # hydra-joblib-launcher, joblib and cloudpickle: hydra/launcher=gpus runs its jobs through them.
  versions=$(python3 -c "import hydra, omegaconf, joblib, cloudpickle; from importlib.metadata import version; print(f'hydra-core=={hydra.__version__} omegaconf=={omegaconf.__version__} joblib=={joblib.__version__} cloudpickle=={cloudpickle.__version__} hydra-joblib-launcher=={version(\"hydra-joblib-launcher\")}')")
  python3 -m pip wheel -q --no-deps -w .whl $versions antlr4-python3-runtime==4.9.3
  for f in "$data"/MNIST/raw/*-ubyte; do gzip -c "$f" > ".gpu-data/MNIST/raw/$(basename "$f").gz"; done
  ls -la .whl .gpu-data/MNIST/raw
  exit 0
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/data/MNIST/raw
for f in .gpu-data/MNIST/raw/*.gz; do gunzip -c "$f" > "/tmp/data/MNIST/raw/$(basename "$f" .gz)"; done
export MNIST_LAB_DATA=/tmp/data
log="${OUT:-/tmp}/gpu_check.log"
quiet=(callbacks.progress_bar=null +trainer.enable_progress_bar=false)

step() { echo; echo "### $*"; "$@" 2>&1 | grep -v -e "it/s]" -e "^\s*$"; }
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)"
  step python3 benchmarks/gpu.py "${quiet[@]}"
  step python3 benchmarks/gpu.py "${quiet[@]}" compile=true
  step python3 benchmarks/gpu.py "${quiet[@]}" data.batch_size=512 optimizer.lr=0.2
  step python3 benchmarks/gpu.py "${quiet[@]}" data.batch_size=512 optimizer.lr=0.2 compile=true
  for seed in 1 2 3; do
    step python3 train.py experiment=fast seed=$seed "${quiet[@]}" hydra.run.dir=/tmp/fast$seed
    python3 -c "import json; m = json.load(open('/tmp/fast$seed/metrics.json')); print('experiment=fast seed $seed:', m['test/acc'], 'training s', round(sum(m['epoch_train_time_s']), 3), m['epoch_train_time_s'])"
  done
  echo; echo "### whole process: python train.py model=lenet trainer.max_epochs=5"
  start=$(date +%s.%N)
  python3 train.py model=lenet trainer.max_epochs=5 "${quiet[@]}" hydra.run.dir=/tmp/lenet5 2>&1 | grep "Test accuracy"
  echo "$(python3 -c "print(round($(date +%s.%N) - $start, 1))") s for the whole process"
  step python3 benchmarks/fixed_cost.py --repeats 2
  # issue 12: the 12-job LeNet sweep, one job at a time and 6 at once on the GPU
  step python3 benchmarks/sweep_concurrency.py --jobs-per-gpu 6 12
} 2>&1 | tee "$log"
