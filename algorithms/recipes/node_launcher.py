"""Composer's launcher for one node of ``thaw run``, quiet when the run stops on a signal.

``thaw run`` starts it in place of ``composer`` (``python -m composer_thaw.recipes.node_launcher <Composer's launcher
arguments>``, :func:`~composer_thaw.recipes.launching.launcher_command`). It reads its arguments and environment and
starts the ranks with Composer's launcher's own functions; it differs in how it watches them:

* A SIGINT (``thaw`` passes on each signal it gets as one) sends SIGTERM to every rank of this node, once: each
  finishes its batch, the ranks of every node agree to stop there and save one checkpoint together, and each writes
  a stop report (:data:`~composer_thaw.recipes.launching.STOP_REPORTS`) and exits 128 + the signal. The launcher
  waits as long as the save takes (Composer's launcher kills the ranks after 30 s); a second SIGINT kills them.
* A rank that stopped so, here or because another node was signalled (its ranks stop at the same batch), is no
  failure: the launcher exits with the ranks' status and prints nothing, so that ``thaw``'s command to resume is the
  last thing printed. Composer's launcher would print a traceback (its ``SystemExit: 130``), an error per rank and
  the other ranks' output.
* Any other rank's exit other than 0 is a failure, handled as Composer's launcher does: the others get SIGTERM,
  and the failed ranks' output and Composer's errors are printed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from subprocess import Popen
from types import FrameType
from typing import Optional

from composer_thaw.recipes.launching import STOP_REPORTS, stop_report_of

__all__ = ['main']

# A rank's exit statuses when a signal this launcher sent ended it: its own exit (Composer's handler, or ours) with
# 128 + the signal, or the signal itself (a negative status).
_STOPPED = {128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL, -signal.SIGINT}


def _stopped_on_request(rank: int, code: int, signalled: bool) -> bool:
    """Whether rank ``rank``'s exit status ``code`` (not 0) ends an interruption rather than a failure: it wrote a
    stop report, or this node was signalled and a signal ended it."""
    folder = os.environ.get(STOP_REPORTS)
    reported = folder is not None and stop_report_of(folder, rank) is not None
    return reported or (signalled and code in _STOPPED)


def _kill(processes: dict[int, Popen]) -> None:
    """SIGKILL every rank that still runs, and the processes it started (as Composer's launcher does)."""
    import psutil

    for process in processes.values():
        if process.poll() is not None:
            continue
        try:
            parent = psutil.Process(process.pid)
            family = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for member in family:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass


def _watch(processes: dict[int, Popen], signals: list[int]) -> Optional[int]:
    """Wait for the ranks; the rank that failed (see the module), or ``None`` once all ended without failure."""
    terminated = killed = False
    while True:
        running = False
        for rank, process in processes.items():
            code = process.poll()
            if code is None:
                running = True
            elif code != 0 and not _stopped_on_request(rank, code, bool(signals)):
                return rank
        if not running:
            return None
        if signals and not terminated:
            for process in processes.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            terminated = True
        if len(signals) > 1 and not killed:
            _kill(processes)
            killed = True
        time.sleep(0.1)


def _exit_status(processes: dict[int, Popen]) -> int:
    """The first rank's status other than 0 (128 + n for signal n, as a shell reports), or 0."""
    for process in processes.values():
        code = process.wait()
        if code != 0:
            return _shell_status(code)
    return 0


def _shell_status(code: int) -> int:
    """An exit status as a shell reports it: 128 + n for a process that signal n ended."""
    return 128 - code if code < 0 else code


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Launch this node's ranks from Composer's launcher arguments ``argv`` and wait for them; their exit status."""
    # deferred: Composer's launcher, in this process only
    from composer.cli import launcher

    sys.argv = ['composer', *(sys.argv[1:] if argv is None else argv)]
    args = launcher._parse_args()
    logging.basicConfig()
    launcher.log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    signals: list[int] = []

    def take_note(signal_number: int, frame: Optional[FrameType]) -> None:
        signals.append(signal_number)

    for number in (signal.SIGINT, signal.SIGTERM):  # Composer's import set sys.exit handlers for them
        signal.signal(number, take_note)
    processes: dict[int, Popen] = {}
    with tempfile.TemporaryDirectory() as logs:
        failed: Optional[int] = None
        try:
            launcher._launch_processes(
                nproc=args.nproc,
                world_size=args.world_size,
                base_rank=args.base_rank,
                node_rank=args.node_rank,
                master_addr=args.master_addr,
                master_port=args.master_port,
                module_mode=args.module_mode,
                command_mode=args.command_mode,
                training_script=args.training_script,
                stdout_file_format=args.stdout or f'{logs}/rank{{rank}}.stdout.txt',
                stderr_file_format=args.stderr or f'{logs}/rank{{rank}}.stderr.txt',
                training_script_args=args.training_script_args,
                processes=processes,
            )
            failed = _watch(processes, signals)
        except Exception:
            traceback.print_exc()
            print('Killing training processes')
            failed = -1
        if failed is None:
            return _exit_status(processes)
        if failed >= 0:
            launcher.log.error(f'Rank {failed} crashed with exit code {processes[failed].returncode}.')
        launcher._cleanup_processes(processes)  # Composer's: SIGTERM, 30 s, SIGKILL; the failed ranks' output
        code = launcher._aggregate_process_returncode(processes)  # Composer's: the first rank's, with its error
        return code if failed < 0 else _shell_status(processes[failed].returncode)  # the failed rank's


if __name__ == '__main__':
    sys.exit(main())
