"""``thaw run`` on several processes and machines: where this node's processes sit in the run, checked before anything
starts; the Composer launcher command that starts them; and how an interrupted run tells ``thaw`` what it saved.

One node of a run on two machines of two processes each (the same command on each, but ``--node-rank``)::

    thaw run recipe.yaml --nproc 2 --nnodes 2 --node-rank 0 --master-addr node0 --master-port 29500   # on node0
    thaw run recipe.yaml --nproc 2 --nnodes 2 --node-rank 1 --master-addr node0 --master-port 29500   # on node1

Each option can instead come from the environment variable Composer's launcher reads (a scheduler sets them; an
option on the command line wins): ``LOCAL_WORLD_SIZE`` (``--nproc``), ``WORLD_SIZE`` (``--world-size``, the
processes of all nodes; read, as Composer does, only where it differs from ``LOCAL_WORLD_SIZE``), ``NODE_RANK`` (or
``BASE_RANK``, the first global rank of this node), ``MASTER_ADDR`` and ``MASTER_PORT``. Every node runs the same
number of processes.

This module imports neither torch nor Composer: ``thaw run`` checks the layout, starts the launcher and waits for
it without them.

Example:
    >>> layout = node_layout(nproc=2, nnodes=2, node_rank=1, master_addr='node0', master_port=29500, environ={})
    >>> layout.world_size, layout.base_rank
    (4, 2)
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Optional, Union

from composer_thaw.core.validation import ConfigError

__all__ = [
    'NODE_LAUNCHER',
    'STOP_REPORTS',
    'NodeLayout',
    'StopReport',
    'launched_rank',
    'launcher_command',
    'node_layout',
    'rank_layout',
    'read_stop_report',
    'resume_commands',
    'run_launcher',
    'write_stop_report',
]

NODE_LAUNCHER = 'composer_thaw.recipes.node_launcher'  # Composer's launcher, quiet when the run stops on a signal
STOP_REPORTS = 'THAW_STOP_REPORTS'  # the folder where each rank of `thaw run` says it stopped on an interruption
PASSED_TO_LAUNCHER = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class NodeLayout:
    """This node's share of a run: ``nproc`` processes on each of ``nnodes`` machines, this one numbered
    ``node_rank`` (from 0); ranks ``base_rank`` to ``base_rank + nproc - 1`` run here. ``master_addr`` and
    ``master_port`` locate node 0's rendezvous (Composer picks a free port on one node when they are ``None``)."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @property
    def base_rank(self) -> int:
        return self.node_rank * self.nproc

    @property
    def described(self) -> str:
        """How the user asked for these processes: ``--nproc 2``, or ``world size 4: --nnodes 2 x --nproc 2``."""
        if self.nnodes == 1:
            return f'--nproc {self.nproc}'
        return f'world size {self.world_size}: --nnodes {self.nnodes} x --nproc {self.nproc}'

    def options(self, node_rank: Optional[int] = None) -> list[str]:
        """The ``thaw run`` options that start node ``node_rank`` (default: this one) of this layout."""
        if self.world_size == 1:
            return []
        if self.nnodes == 1:
            return ['--nproc', str(self.nproc)]
        rank = self.node_rank if node_rank is None else node_rank
        return [
            *('--nproc', str(self.nproc), '--nnodes', str(self.nnodes), '--node-rank', str(rank)),
            *('--master-addr', str(self.master_addr), '--master-port', str(self.master_port)),
        ]


def _number(key: str, value: object, what: str, minimum: int, maximum: Optional[int] = None) -> int:
    """``value`` (an option's int, or an environment variable's text) as a whole number in range, or a ConfigError
    naming ``key`` and what is valid."""
    valid = f'expected {what}: a whole number, at least {minimum}' + (f', at most {maximum}.' if maximum else '.')
    try:
        number = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value).strip())
    except ValueError:
        raise ConfigError(key, value, valid) from None
    if number < minimum or (maximum is not None and number > maximum):
        raise ConfigError(key, value, valid)
    return number


def _option_or_environment(
    option: str, value: object, variable: str, environ: Mapping[str, str]
) -> tuple[Optional[object], str]:
    """The option's value if given, else the environment variable's (``None`` if neither), with the name an error
    names it by."""
    if value is not None:
        return value, option
    if environ.get(variable, '') != '':
        return environ[variable], variable
    return None, option


def node_layout(
    *,
    nproc: Union[int, str, None] = None,
    nnodes: Union[int, str, None] = None,
    world_size: Union[int, str, None] = None,
    node_rank: Union[int, str, None] = None,
    master_addr: Optional[str] = None,
    master_port: Union[int, str, None] = None,
    environ: Mapping[str, str],
) -> NodeLayout:
    """This node's layout from ``thaw run``'s options (numbers, or the command line's text) and, where an option is
    not given, Composer's launcher environment variables.

    Raises :class:`ConfigError` on a value that cannot start (before anything launches): a count below 1, a world
    size that is not a multiple of ``--nproc``, a node rank outside ``0 .. nnodes - 1``, several nodes without
    ``--master-addr`` / ``--master-port``."""
    value, key = _option_or_environment('--nproc', nproc, 'LOCAL_WORLD_SIZE', environ)
    processes = 1 if value is None else _number(key, value, 'the number of processes on this node', 1)
    nproc_key = key if value is not None else '--nproc'
    nodes = None if nnodes is None else _number('--nnodes', nnodes, 'the number of nodes (machines)', 1)
    value, key = world_size, '--world-size'
    if value is None and environ.get('WORLD_SIZE', '') not in ('', environ.get('LOCAL_WORLD_SIZE')):
        value, key = environ['WORLD_SIZE'], 'WORLD_SIZE'  # as Composer's launcher reads it
    if value is not None:
        total = _number(key, value, 'the number of processes on all nodes', 1)
        if total % processes:
            raise ConfigError(
                key,
                value,
                f'expected a multiple of {nproc_key} {processes}: every node runs {processes} processes '
                f'({", ".join(str(processes * n) for n in (1, 2, 3))}, ...).',
            )
        if nodes is not None and total != nodes * processes:
            raise ConfigError(
                key,
                value,
                f'expected --nnodes {nodes} x {nproc_key} {processes} = {nodes * processes}, or only one of '
                '--nnodes and --world-size.',
            )
        nodes = total // processes
    nodes = nodes or 1
    rank = _node_rank(node_rank, processes, nodes, environ)
    address, key = _option_or_environment('--master-addr', master_addr, 'MASTER_ADDR', environ)
    if address is not None and not str(address).strip():
        raise ConfigError(key, address, 'expected the host name or address of node 0.')
    port_value, port_key = _option_or_environment('--master-port', master_port, 'MASTER_PORT', environ)
    port = None if port_value is None else _number(port_key, port_value, 'a TCP port on node 0', 1, 65535)
    if nodes > 1 and address is None:
        raise ConfigError(
            '--master-addr',
            None,
            f'a run on {nodes} nodes needs the host name or address of node 0 (where rank 0 runs), the same on '
            'every node (or MASTER_ADDR).',
        )
    if nodes > 1 and port is None:
        raise ConfigError(
            '--master-port',
            None,
            f'a run on {nodes} nodes needs a free TCP port on node 0, the same on every node (or MASTER_PORT), '
            'e.g. 29500.',
        )
    return NodeLayout(processes, nodes, rank, None if address is None else str(address).strip(), port)


def _node_rank(option: Union[int, str, None], nproc: int, nnodes: int, environ: Mapping[str, str]) -> int:
    """This node's number: ``--node-rank``, else ``NODE_RANK``, else ``BASE_RANK / nproc``, else 0."""
    valid = f'expected 0 to {nnodes - 1}: the number of this node among the {nnodes} (--nnodes), from 0.'
    value, key = _option_or_environment('--node-rank', option, 'NODE_RANK', environ)
    if value is None and environ.get('BASE_RANK', '') != '':
        base = _number('BASE_RANK', environ['BASE_RANK'], "the global rank of this node's first process", 0)
        if base % nproc:
            raise ConfigError(
                'BASE_RANK', environ['BASE_RANK'], f'expected node rank x {nproc} (--nproc): every node runs {nproc}.'
            )
        value, key = base // nproc, 'BASE_RANK / --nproc'
    if value is None:
        return 0
    rank = _number(key, value, f'0 to {nnodes - 1}', 0)
    if rank >= nnodes:
        raise ConfigError(key, value, valid)
    return rank


def launched_rank(environ: Mapping[str, str]) -> bool:
    """Whether this process is one rank of a launched run (Composer's launcher or torchrun set ``RANK``,
    ``LOCAL_RANK`` and ``MASTER_ADDR``): it trains itself and starts no launcher. Composer fills in ``RANK=0`` and
    ``LOCAL_RANK=0`` (but no address) when a single process initializes torch.distributed, which does not make
    that process a launched rank."""
    return all(name in environ for name in ('RANK', 'LOCAL_RANK', 'MASTER_ADDR'))


def rank_layout(environ: Mapping[str, str]) -> NodeLayout:
    """The layout a launched rank runs in, from the variables its launcher set (one process when there are none)."""
    world = int(environ.get('WORLD_SIZE') or 1)
    nproc = int(environ.get('LOCAL_WORLD_SIZE') or world)
    port = environ.get('MASTER_PORT')
    return NodeLayout(
        nproc=nproc,
        nnodes=max(world // nproc, 1),
        node_rank=int(environ.get('NODE_RANK') or 0),
        master_addr=environ.get('MASTER_ADDR'),
        master_port=int(port) if port else None,
    )


def launcher_command(layout: NodeLayout, run_arguments: Sequence[str]) -> list[str]:
    """The command that starts this node's ranks, each running ``python -m composer_thaw.cli <run_arguments>``:
    Composer's launcher arguments, every one explicit (so no environment variable can disagree with the layout
    checked), run by :mod:`~composer_thaw.recipes.node_launcher`."""
    command = [sys.executable, '-m', NODE_LAUNCHER, '-n', str(layout.nproc)]
    if layout.nnodes > 1:
        command += ['--world_size', str(layout.world_size), '--node_rank', str(layout.node_rank)]
        command += ['--base_rank', str(layout.base_rank)]
    if layout.master_addr is not None:
        command += ['--master_addr', layout.master_addr]
    if layout.master_port is not None:
        command += ['--master_port', str(layout.master_port)]
    return [*command, '-m', 'composer_thaw.cli', *run_arguments]


def resume_commands(run_command: Sequence[str], layout: NodeLayout) -> list[str]:
    """The shell lines that run ``run_command`` (``thaw run recipe --set ...``) again on this layout: one line on one
    node, one per node (``--node-rank 0`` to ``nnodes - 1``) on several."""
    return [shlex.join([*run_command, *layout.options(node)]) for node in range(layout.nnodes)]


@dataclass(frozen=True)
class StopReport:
    """What a rank says when it stopped on an interruption: the signal (``None``: stopped at once, on a second one),
    the batch it had finished and the checkpoint saved there."""

    signal_number: Optional[int] = None
    batch: Optional[int] = None
    checkpoint: Optional[str] = None


def write_stop_report(folder: str, rank: int, report: StopReport) -> None:
    """Tell the node's launcher and ``thaw`` that rank ``rank`` stopped on request (before it exits)."""
    path = Path(folder) / f'rank{rank}.json'
    temporary = path.with_suffix('.tmp')
    temporary.write_text(json.dumps(vars(report)))
    temporary.replace(path)


def stop_report_of(folder: str, rank: int) -> Optional[StopReport]:
    """Rank ``rank``'s report, ``None`` if it wrote none."""
    path = Path(folder) / f'rank{rank}.json'
    return StopReport(**json.loads(path.read_text())) if path.is_file() else None


def read_stop_report(folder: str) -> Optional[StopReport]:
    """The report of this node's lowest rank that wrote one (every rank stopped at the same batch), ``None`` if
    none did."""
    paths = sorted(Path(folder).glob('rank*.json'), key=lambda path: int(path.stem[4:]))
    return StopReport(**json.loads(paths[0].read_text())) if paths else None


def run_launcher(command: Sequence[str], env: Mapping[str, str], passed: Optional[list[int]] = None) -> int:
    """Run the launcher (``command``) to its end, in a session of its own, and return its exit status (128 + n
    when signal n ended it, as a shell reports).

    SIGINT, SIGTERM and SIGHUP received meanwhile are passed on to the launcher as SIGINT (and appended to
    ``passed``): its Ctrl-C, on which it sends SIGTERM to every rank (each saves at its batch's end and stops) and
    waits for them; passed on a second time, the launcher stops waiting and kills them. Being in another session,
    the launcher and its ranks get no signal from the terminal directly, so a Ctrl-C reaches them once, through here.

    Example:
        >>> import os, sys
        >>> run_launcher([sys.executable, '-c', 'raise SystemExit(3)'], os.environ)  # thaw's: the node launcher's
        3
        >>> run_launcher([sys.executable, '-c', 'import os, signal; os.kill(os.getpid(), signal.SIGTERM)'], os.environ)
        143
    """
    launcher = subprocess.Popen(list(command), env=dict(env), start_new_session=True)

    def pass_on(signal_number: int, frame: Optional[FrameType]) -> None:
        if passed is not None:
            passed.append(signal_number)
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGINT)

    previous = {number: signal.signal(number, pass_on) for number in PASSED_TO_LAUNCHER}
    try:
        code = launcher.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return 128 - code if code < 0 else code
