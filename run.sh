#!/usr/bin/env bash
# Set up everything on a fresh Debian/Ubuntu machine with Python 3.10+, then do one job:
#   bash run.sh train   fit TinyVGG (configs/tinyvgg.yaml), then test its best checkpoint
#   bash run.sh test    run the quick test suite (what .ci/run runs first; `-m slow` are the rest)
#   bash run.sh setup   only install (dataset, virtual environment, package)
# Environment: PYTHON (default python3), VENV (default .venv), TORCH_SPEC (the torch/torchvision
# requirement installed first; default the versions this project is tested with), TORCH_INDEX (an
# extra package index for them; default PyTorch's CPU-only wheels where nvidia-smi is absent, none
# where it is: the CUDA wheels of PyPI are gigabytes a CPU never uses).
set -euo pipefail
cd "$(dirname "$0")"
job=${1:-}
case "$job" in train|test|setup) ;; *) echo "usage: bash run.sh train|test|setup" >&2; exit 2 ;; esac

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
SYSTEM_DATA=/usr/share/datasets/fashion-mnist

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

# 1. Debian's packages: the dataset (unless a copy is already there; torchvision downloads otherwise)
#    and, for the test job, a PostgreSQL server (the test of sweeps shared through a database).
packages=()
if [ ! -f "$SYSTEM_DATA/train-images-idx3-ubyte.gz" ] && [ ! -d data/FashionMNIST/raw ]; then
  packages+=(dataset-fashion-mnist)
fi
if [ "$job" = test ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  packages+=(postgresql)
fi
if [ ${#packages[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && as_root true 2>/dev/null; then
    as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" \
      || echo "run.sh: could not install ${packages[*]}; torchvision will try to download the data" >&2
  else
    echo "run.sh: no apt-get/root: torchvision will try to download the data (and the PostgreSQL test is skipped)" >&2
  fi
fi

# 2. A virtual environment with the package and its test tools.
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# torch: where there is no NVIDIA GPU, PyPI's default Linux wheels would bring gigabytes of CUDA
# libraries, so PyTorch's CPU-only index is added (as an extra index: its +cpu builds win where it is
# reachable; where it is not, the usual indexes, local ones included, as with a GPU).
if [ -z "${TORCH_INDEX+set}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then TORCH_INDEX=""; else TORCH_INDEX=https://download.pytorch.org/whl/cpu; fi
fi
torch_index=()
if [ -n "$TORCH_INDEX" ]; then
  if "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10)' \
    "$TORCH_INDEX" 2>/dev/null; then
    echo "run.sh: no NVIDIA GPU (nvidia-smi not found): CPU-only torch wheels from $TORCH_INDEX" >&2
    torch_index=(--extra-index-url "$TORCH_INDEX")
  else
    echo "run.sh: no NVIDIA GPU (nvidia-smi not found), but $TORCH_INDEX cannot be reached: torch from pip's usual indexes" >&2
  fi
fi
# shellcheck disable=SC2086
"$PY" -m pip install -q "${torch_index[@]}" $TORCH_SPEC
"$PY" -c 'import torch; print(f"run.sh: torch {torch.__version__}, built for", f"CUDA {torch.version.cuda}" if torch.version.cuda else "the CPU only")' >&2
# Compiled to bytecode at install (pip's default): with PYTHONDONTWRITEBYTECODE set, as on this project's
# machines, an uncompiled install recompiles every module in every process (imports took twice as long).
"$PY" -m pip install -q -e ".[test]"
echo "run.sh: set up in $SECONDS s" >&2

# 3. The job.
case "$job" in
  train)
    "$PY" -m fmnist_lightning fit --config configs/tinyvgg.yaml
    "$PY" -m fmnist_lightning test --config configs/tinyvgg.yaml --ckpt_path best
    ;;
  test)
    "$PY" -m pytest -q -m "not slow" -n auto  # one test process per core (pytest-xdist)
    ;;
esac
