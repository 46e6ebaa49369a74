# Sourced by the launch scripts: run_workers COMMAND... runs a launcher (accelerate's, which
# runs torchrun) and exits with the training processes' own exit code.
#
# torchrun exits 1 whenever a worker fails, whatever its code, and accelerate's one-process
# launcher does the same: a config error (2), a divergence (3) or a preemption after a checkpoint
# (75) would all read as a crash to launch/auto_resume.sh and launch/slurm.sbatch. Each worker
# writes its code to $PIPELINE_EXIT_DIR/rank-<RANK> (pipeline.errors.recorded_exit); a failed
# launch exits with the code written first (the first failure: the others are its consequence),
# or the launcher's own when no worker wrote one (killed outright). The launcher (torchrun) runs
# in the background: TERM, HUP, USR1 and USR2 sent to this shell's process alone (a scheduler's
# preemption notice) are passed on to it, and it forwards them to every worker
# (PET_SIGNALS_TO_HANDLE). INT and QUIT come from a terminal to the whole process group, the
# launcher included, so this shell only outlives them to report the code. (A background job's
# INT and QUIT start ignored; torchrun installs its own handlers, so its workers have them.)
run_workers() {
    local codes pid code first sig last
    set +e  # the workers' failures are this function's to read, not the caller's to exit on
    codes=$(mktemp -d)
    export PIPELINE_EXIT_DIR=$codes
    "$@" &
    pid=$!
    for sig in TERM HUP USR1 USR2; do
        # shellcheck disable=SC2064  # the pid is fixed now
        trap "kill -s $sig $pid 2>/dev/null" "$sig"
    done
    trap : INT QUIT
    code=0
    while :; do
        wait "$pid"
        code=$?
        kill -0 "$pid" 2>/dev/null || break  # returned because a trapped signal arrived
    done
    wait "$pid"  # exited while a signal was trapped: its status, not the signal's 128 + n
    last=$?
    [ "$last" -ne 127 ] && code=$last
    if [ "$code" -ne 0 ]; then
        first=$(cd "$codes" && ls -tr | while read -r f; do
            c=$(cat "$f"); [ "$c" != 0 ] && { echo "$c"; break; }; done)
        [ -n "$first" ] && code=$first
    fi
    rm -rf "$codes"
    exit "$code"
}
