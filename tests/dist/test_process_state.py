"""A silent rank is killed as frozen only when it is: ``process_state`` tells a stopped process
(SIGSTOP) and a hung one (every thread asleep) from one that is running but starved of CPU."""
import os
import signal
import subprocess
import sys
import time

from seqshard.dist.cause import process_state


def _wait_for(pid, want, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        state = process_state(pid)
        if state == want:
            return state
        time.sleep(0.05)
    return process_state(pid)


def test_stopped_running_and_sleeping_processes():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _wait_for(busy.pid, "running") == "running"
        assert _wait_for(idle.pid, "sleeping") == "sleeping"
        os.kill(busy.pid, signal.SIGSTOP)
        assert _wait_for(busy.pid, "stopped") == "stopped"
        os.kill(busy.pid, signal.SIGCONT)
        assert _wait_for(busy.pid, "running") == "running"
    finally:
        for p in (busy, idle):
            p.kill()
            p.wait()
    assert process_state(busy.pid) is None  # gone
