# Sourced by the launch scripts: run_workers COMMAND... runs a launcher (accelerate's, which
# runs torchrun) and exits with the training processes' own exit code.
#
# torchrun exits 1 whenever a worker fails, whatever its code, and accelerate's one-process
# launcher does the same: a config error (2), a divergence (3) or a preemption after a checkpoint
# (75) would all read as a crash to launch/auto_resume.sh and launch/slurm.sbatch. Each worker
# writes its code to $PIPELINE_EXIT_DIR/rank-<RANK> (pipeline.errors.recorded_exit); a failed
# launch exits with the code written first (the first failure: the others are its consequence),
# or the launcher's own when no worker wrote one (killed outright). The launcher runs in the
# background so that the preemption signals (TERM, INT, HUP, QUIT, USR1) reaching this shell are
# passed on to it, as `exec` did; torchrun forwards them to every worker (PET_SIGNALS_TO_HANDLE).
run_workers() {
    local codes pid code first sig
    set +e  # the workers' failures are this function's to read, not the caller's to exit on
    codes=$(mktemp -d)
    export PIPELINE_EXIT_DIR=$codes
    "$@" &
    pid=$!
    for sig in TERM INT HUP QUIT USR1; do
        # shellcheck disable=SC2064  # the pid is fixed now
        trap "kill -s $sig $pid 2>/dev/null" "$sig"
    done
    code=0
    while :; do
        wait "$pid"
        code=$?
        kill -0 "$pid" 2>/dev/null || break  # returned because a trapped signal arrived
    done
    if [ "$code" -ne 0 ]; then
        first=$(cd "$codes" && ls -tr | while read -r f; do
            c=$(cat "$f"); [ "$c" != 0 ] && { echo "$c"; break; }; done)
        [ -n "$first" ] && code=$first
    fi
    rm -rf "$codes"
    exit "$code"
}
