#!/usr/bin/env bash
# Train across several machines. Run the same command on every node, with the same overrides:
#   MAIN_ADDR=10.0.0.1 NNODES=2 NODE_RANK=0 bash launch/train_multi_node.sh experiment=gpt2_xl_10bt
#   MAIN_ADDR=10.0.0.1 NNODES=2 NODE_RANK=1 bash launch/train_multi_node.sh experiment=gpt2_xl_10bt
# MAIN_ADDR: address of node 0 reachable from all nodes; MAIN_PORT: a free port on it (29500);
# GPUS_PER_NODE: default all GPUs of this node. Every node needs the same shards at the same
# path (a shared file system, or `make download-shards` on each node) and runs/ on storage every
# node reads (checkpoints are written by global rank 0, and every node resumes from the one node
# 0 chooses; a node that cannot read it stops the job with one line, exit 2).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MAIN_ADDR:?set MAIN_ADDR to the address of node 0}"
: "${NNODES:?set NNODES to the number of machines}"
: "${NODE_RANK:?set NODE_RANK to the index of this machine, 0 .. NNODES-1}"
MAIN_PORT=${MAIN_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
[ "$GPUS_PER_NODE" -ge 1 ] || { echo "error: no GPU found; set GPUS_PER_NODE" >&2; exit 2; }
PYTHON=${PYTHON:-.venv/bin/python}
# torchrun forwards these signals to every worker and then waits PET_SHUTDOWN_TIMEOUT seconds:
# the trainer finishes its step, writes a checkpoint and exits (SLURM sends SIGUSR1 or SIGTERM,
# submitit SIGUSR2).
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2}
export PET_SHUTDOWN_TIMEOUT=${PET_SHUTDOWN_TIMEOUT:-300}
source launch/workers.sh  # run_workers: the training processes' own exit code, signals passed on
run_workers "$PYTHON" -m accelerate.commands.launch --config_file launch/multi_gpu.yaml \
    --num_machines "$NNODES" --machine_rank "$NODE_RANK" \
    --num_processes $((NNODES * GPUS_PER_NODE)) \
    --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" \
    -m pipeline.train "$@"
