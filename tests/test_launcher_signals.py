"""``thaw run --nproc N``: signals reach Composer's launcher once, through ``thaw`` (composer_thaw.recipes.launching's
``run_launcher``). A stand-in launcher records the signals it gets; what the real one does with them (SIGTERM to
every rank, which saves and stops) is the ``interruption`` part of tests/two_processes.py, and tests/test_nodes.py
(the node launcher, and two nodes on localhost)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import REPO

# Records each signal, says it is ready (with its process group), and ends as a rank that saved would: 130, half a
# second after the first signal.
STAND_IN_LAUNCHER = """
import os, pathlib, signal, sys, time
log, ready = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def note(number, frame):
    with log.open('a') as f:
        f.write(signal.Signals(number).name + '\\n')
for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(number, note)
ready.write_text(f'{os.getpid()} {os.getpgid(0)}')
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    if log.exists():
        time.sleep(0.5)
        sys.exit(130)
    time.sleep(0.05)
sys.exit(1)
"""

THAW = (
    'import os, sys; from composer_thaw.recipes.launching import run_launcher; '
    'sys.exit(run_launcher(sys.argv[1:], os.environ))'
)


def _start(tmp_path: Path) -> tuple[subprocess.Popen, int, int]:
    """``thaw`` (in a process group of its own, as a shell starts a command) running the stand-in launcher; returns
    it with the launcher's pid and process group once the launcher is ready."""
    log, ready = tmp_path / 'signals.log', tmp_path / 'ready'
    thaw = subprocess.Popen(
        [sys.executable, '-c', THAW, sys.executable, '-c', STAND_IN_LAUNCHER, str(log), str(ready)],
        cwd=REPO,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not ready.exists() or not ready.read_text():
        assert thaw.poll() is None and time.monotonic() < deadline, 'the launcher did not start'
        time.sleep(0.05)
    pid, group = map(int, ready.read_text().split())
    return thaw, pid, group


SENDS = {
    'Ctrl-C in a terminal (SIGINT to the foreground group)': lambda thaw: os.killpg(thaw.pid, signal.SIGINT),
    'SIGTERM to thaw alone (kill, a container stopping its main process)': lambda thaw: thaw.send_signal(
        signal.SIGTERM
    ),
    'the terminal closing (SIGHUP)': lambda thaw: os.killpg(thaw.pid, signal.SIGHUP),
}


@pytest.mark.parametrize('send', SENDS.values(), ids=SENDS.keys())
def test_a_signal_reaches_the_launcher_once_as_ctrl_c_and_thaw_waits_for_it(send, tmp_path):
    thaw, _, launcher_group = _start(tmp_path)
    assert launcher_group != os.getpgid(thaw.pid), 'the launcher shares the terminal-facing process group'
    send(thaw)
    assert thaw.wait(timeout=60) == 130  # the launcher's status, after its ranks stopped
    assert (tmp_path / 'signals.log').read_text().split() == ['SIGINT']


def test_a_launcher_ended_by_a_signal_gives_the_shells_status(tmp_path):
    thaw, launcher, _ = _start(tmp_path)
    os.kill(launcher, signal.SIGKILL)
    assert thaw.wait(timeout=60) == 128 + signal.SIGKILL
