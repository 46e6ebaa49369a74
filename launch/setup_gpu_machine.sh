#!/usr/bin/env bash
# Set up a fresh Ubuntu GPU machine for training: system packages, an optional data disk,
# CUDA PyTorch and this project. Run from the repository root:
#   bash launch/setup_gpu_machine.sh                  # or: make setup-gpu
#   DATA_DISK=/dev/nvme1n1 bash launch/setup_gpu_machine.sh
# DATA_DISK (optional): a block device, formatted (only if it holds no file system) and mounted
# at DATA_DIR; shards/ and runs/ then live there and survive a reinstall of the boot disk.
set -euo pipefail
DATA_DISK=${DATA_DISK:-}
DATA_DIR=${DATA_DIR:-/data}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
# build-essential: torch.compile's Inductor and Triton compile C and C++ helpers at run time
$sudo apt-get install -y -qq python3-venv python3-dev build-essential git make tmux >/dev/null

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi >/dev/null; then
    echo "error: no working NVIDIA driver (nvidia-smi failed); use an image with the driver" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

if [ -n "$DATA_DISK" ]; then
    $sudo blkid "$DATA_DISK" >/dev/null || $sudo mkfs.ext4 -q -F "$DATA_DISK"
    $sudo mkdir -p "$DATA_DIR"
    mountpoint -q "$DATA_DIR" || $sudo mount "$DATA_DISK" "$DATA_DIR"
    $sudo chown "$(id -u):$(id -g)" "$DATA_DIR"
fi
if [ -d "$DATA_DIR" ] && [ -w "$DATA_DIR" ]; then
    mkdir -p "$DATA_DIR/shards" "$DATA_DIR/runs" "$DATA_DIR/hf_cache"
    # Keep the tracked shards/.gitkeep; put each dataset folder on the data disk instead.
    [ -e runs ] || ln -s "$DATA_DIR/runs" runs
    echo "data disk: $DATA_DIR (runs/ links there; prepare with out_dir=$DATA_DIR/shards)"
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "$TORCH_SPEC"   # PyPI's Linux wheels are the CUDA builds
.venv/bin/pip install -q -e '.[dev,gpu,mirror]'   # gpu: liger-kernel; mirror: s3fs, gcsfs
touch .venv/.installed
.venv/bin/python - <<'PY'
import torch
assert torch.cuda.is_available(), "torch sees no GPU: check the driver and the torch build"
names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} GPU(s): {', '.join(names)}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
PY
echo "ready: make prepare SOURCE=fineweb_sample_10bt && make train EXPERIMENT=gpt2_124m_10bt NPROC=$(nvidia-smi -L | wc -l)"
