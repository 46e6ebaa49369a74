#!/usr/bin/env bash
# Train on all GPUs of this machine (DDP through accelerate), resuming if the run has
# checkpoints. Extra arguments are Hydra overrides:
#   bash launch/train_single_node.sh experiment=gpt2_124m_10bt
#   NPROC=4 bash launch/train_single_node.sh experiment=gpt2_124m_10bt trainer.micro_batch_size=32
# MAIN_PORT: the rendezvous port (29500); jobs side by side on one machine each need their own.
# Runs in the caller's folder (relative trainer.runs_dir and data.shard_dir stay the caller's).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
NPROC=${NPROC:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
[ "$NPROC" -ge 1 ] || { echo "error: no GPU found; set NPROC" >&2; exit 2; }
PYTHON=${PYTHON:-$repo/.venv/bin/python}
# torchrun forwards these signals to every worker and then waits PET_SHUTDOWN_TIMEOUT seconds:
# the trainer finishes its step, writes a checkpoint and exits (SLURM sends SIGUSR1 or SIGTERM,
# submitit SIGUSR2).
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2}
export PET_SHUTDOWN_TIMEOUT=${PET_SHUTDOWN_TIMEOUT:-300}
if [ "$NPROC" -eq 1 ]; then  # one process needs no launcher: its own exit code and signals
    exec "$PYTHON" -m pipeline.train "$@"
fi
# run_workers: the training processes' own exit code, signals passed on
source "$repo/launch/workers.sh"
run_workers "$PYTHON" -m accelerate.commands.launch --config_file "$repo/launch/multi_gpu.yaml" \
    --num_processes "$NPROC" --main_process_port "${MAIN_PORT:-29500}" -m pipeline.train "$@"
