"""The tools' one way to run a child process (pipeline.tools.process.run_timed): its time limit
takes the whole process tree, a missing program is exit 127, a log file gets the output."""

from __future__ import annotations

import os
import sys
import time

import pytest

from pipeline.tools.process import NOT_FOUND, run_timed


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie left for its reaper is not running
        return f.read().split(")")[-1].split()[0] != "Z"


def test_the_time_limit_kills_the_child_and_its_own_children(tmp_path):
    """The grandchild runs in a session of its own, as torchrun starts its workers, and holds
    the output pipe: it goes too, and the call returns."""
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
        "                     start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(120)\n"
    )
    done = run_timed([sys.executable, "-c", code], timeout_s=3)
    assert done.timed_out and not done.ok and done.returncode is None
    assert done.why() == "timed out after 3 s" and done.stdout == "started\n"
    assert 3 <= done.seconds < 60
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(grandchild)
    with pytest.raises(RuntimeError, match=r"^x failed \(timed out after 3 s\):\nstarted\n$"):
        done.check("x")


def test_exit_code_output_and_environment_of_a_finished_child():
    code = "import os, sys; print(os.environ['EXTRA']); print('oops', file=sys.stderr); sys.exit(4)"
    done = run_timed([sys.executable, "-c", code], env={"EXTRA": "given"})
    assert (done.returncode, done.stdout, done.stderr) == (4, "given\n", "oops\n")
    assert done.last_line() == "oops" and done.why() == "exit 4"
    with pytest.raises(RuntimeError, match=r"^y failed \(exit 4\):\ngiven\noops\n$"):
        done.check("y")
    assert run_timed([sys.executable, "-c", "print(1)"]).check("z").stdout == "1\n"


def test_a_missing_program_is_exit_127_and_one_that_cannot_run_126(tmp_path):
    done = run_timed([str(tmp_path / "no-such-program")])
    assert done.returncode == NOT_FOUND and "no-such-program" in done.stderr
    (tmp_path / "not-executable").write_text("echo hi\n")
    assert run_timed([str(tmp_path / "not-executable")]).returncode == 126


def test_a_log_file_gets_both_streams_appended(tmp_path):
    log = tmp_path / "logs" / "run.log"
    code = "import sys; print('out'); print('err', file=sys.stderr)"
    run_timed([sys.executable, "-c", code], log=log).check("first")
    done = run_timed([sys.executable, "-c", "print('second')"], log=log)
    assert done.stdout == "second\n"  # only what this run added
    assert sorted(log.read_text().splitlines()) == ["err", "out", "second"]
