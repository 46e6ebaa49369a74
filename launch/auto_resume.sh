#!/usr/bin/env bash
# Run a training command again and again until the run is complete:
#   bash launch/auto_resume.sh .venv/bin/python -m pipeline.train experiment=gpt2_124m_10bt
#   NPROC=8 bash launch/auto_resume.sh bash launch/train_single_node.sh experiment=gpt2_124m_10bt
#   make train-auto EXPERIMENT=gpt2_124m_10bt NPROC=8
# Each start continues from the newest good checkpoint (checkpoint.resume=auto), and a run that is
# already complete exits 0 at once, which ends the loop.
# Exit codes of `python -m pipeline.train`: 0 complete; 75 stopped by SIGTERM/SIGUSR1/SIGUSR2
# after a checkpoint (restart); 2 config, data or checkpoint error and 3 diverged (a restart
# cannot fix them: stop); anything else a crash (restart). Launchers of several processes
# (accelerate, torchrun) report any worker failure as 1, so the loop also stops after
# FAST_FAILURES starts in a row (default 3) that each failed within MIN_RUNTIME seconds (default
# 120): a run that cannot start. MAX_RESTARTS (default 100) bounds the loop; RESTART_DELAY
# (default 10 s) spaces the starts.
set -uo pipefail
MAX_RESTARTS=${MAX_RESTARTS:-100}
RESTART_DELAY=${RESTART_DELAY:-10}
MIN_RUNTIME=${MIN_RUNTIME:-120}
FAST_FAILURES=${FAST_FAILURES:-3}
[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 64; }

fast=0
for ((restarts = 0; ; restarts++)); do
    started=$SECONDS
    "$@"
    code=$?
    case $code in
        0) echo "auto_resume: run complete"; exit 0 ;;
        2|3) echo "auto_resume: exit code $code, which a restart cannot fix: stopping" >&2
             exit "$code" ;;
        75) echo "auto_resume: preempted after a checkpoint" >&2 ;;
        *) echo "auto_resume: crashed with exit code $code" >&2 ;;
    esac
    if [ $((SECONDS - started)) -lt "$MIN_RUNTIME" ] && [ "$code" -ne 75 ]; then
        fast=$((fast + 1))
    else
        fast=0
    fi
    if [ "$fast" -ge "$FAST_FAILURES" ]; then
        echo "auto_resume: $fast starts in a row failed within ${MIN_RUNTIME}s: stopping" >&2
        exit "$code"
    fi
    if [ "$restarts" -ge "$MAX_RESTARTS" ]; then
        echo "auto_resume: $MAX_RESTARTS restarts used up: stopping" >&2
        exit "$code"
    fi
    echo "auto_resume: restart $((restarts + 1)) of $MAX_RESTARTS in ${RESTART_DELAY}s" >&2
    sleep "$RESTART_DELAY"
done
