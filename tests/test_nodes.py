"""``thaw run`` on several machines: its options (and the launcher's environment variables) checked in one line before
anything starts; Composer's launcher for one node (composer_thaw.recipes.node_launcher) quiet on an interruption and
as loud as Composer's on a failure; two nodes of one process each on localhost, where a SIGTERM to one node stops
both at the same batch with one checkpoint, each node printing the commands that resume, last, and those commands
resume the run on both nodes.

The launcher's own tests run stand-in ranks (no torch); the 2-node run trains a tiny decoder.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from support import REPO, TINY_HIFT_RUN, set_args

from composer_thaw.cli import EXIT_INVALID, main
from composer_thaw.recipes import launching
from composer_thaw.recipes.launching import NodeLayout, node_layout, resume_commands

DEMO = 'yamls/demo.yaml'
THAW = Path(sys.executable).with_name('thaw')


def test_thaw_run_help_lists_the_multi_node_options(capsys):
    with pytest.raises(SystemExit) as exit:
        main(['run', '--help'])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for option in ('--nproc', '--nnodes', '--world-size', '--node-rank', '--master-addr', '--master-port'):
        assert option in text
    for variable in ('LOCAL_WORLD_SIZE', 'WORLD_SIZE', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        assert variable in text


NODE = ['--master-addr', '127.0.0.1', '--master-port', '29500']
NODE_ENV = {'MASTER_ADDR': 'n0', 'MASTER_PORT': '1'}
REFUSED = {
    'no processes': (['--nproc', '0'], {}, "--nproc = '0': expected the number of processes on this node"),
    'not a number': (['--nnodes', 'two', *NODE], {}, "--nnodes = 'two': expected the number of nodes"),
    'node rank past the last node': (['--nnodes', '2', '--node-rank', '2', *NODE], {}, 'expected 0 to 1'),
    'negative node rank': (['--nnodes', '2', '--node-rank', '-1', *NODE], {}, "--node-rank = '-1'"),
    'world size not a multiple of nproc': (
        ['--world-size', '5', '--nproc', '2', *NODE],
        {},
        "--world-size = '5': expected a multiple of --nproc 2",
    ),
    'world size and nnodes disagree': (
        ['--world-size', '6', '--nnodes', '2', '--nproc', '2', *NODE],
        {},
        'expected --nnodes 2 x --nproc 2 = 4',
    ),
    'several nodes without an address': (['--nnodes', '2', '--node-rank', '1'], {}, '--master-addr = None'),
    'several nodes without a port': (
        ['--nnodes', '2', '--master-addr', 'node0'],
        {},
        '--master-port = None: a run on 2 nodes needs a free TCP port',
    ),
    'port out of range': (['--master-port', '70000'], {}, "--master-port = '70000'"),
    'NODE_RANK past the last node': (['--nproc', '2', *NODE], {'WORLD_SIZE': '4', 'NODE_RANK': '2'}, "NODE_RANK = '2'"),
    'WORLD_SIZE not a multiple of LOCAL_WORLD_SIZE': (
        [*NODE],
        {'WORLD_SIZE': '3', 'LOCAL_WORLD_SIZE': '2'},
        "WORLD_SIZE = '3': expected a multiple of LOCAL_WORLD_SIZE 2",
    ),
    'BASE_RANK inside a node': (['--nproc', '2', *NODE], {'WORLD_SIZE': '4', 'BASE_RANK': '1'}, "BASE_RANK = '1'"),
    'HSDP copies that do not divide the world size': (
        ['--nnodes', '2', '--nproc', '2', *NODE, '--set', 'parallelism={fsdp: {data_parallel_replicate_degree: 3}}'],
        {},
        'data_parallel_replicate_degree = 3: must divide the number of processes (world size 4: --nnodes 2 x '
        '--nproc 2)',
    ),
    'batch not divisible by the world size': (
        ['--nnodes', '3', '--node-rank', '1', *NODE],
        {},
        'global_train_batch_size = 4: must be divisible by the number of processes (world size 3: --nnodes 3 x '
        '--nproc 1)',
    ),
}


@pytest.mark.parametrize('options, environ, error', REFUSED.values(), ids=REFUSED.keys())
def test_bad_multi_node_values_are_refused_in_one_line_before_anything_launches(
    options, environ, error, monkeypatch, capsys
):
    # as in a fresh shell: an earlier test's single-process Trainer may have had Composer set RANK=0, LOCAL_RANK=0
    for variable in ('WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'NODE_RANK', 'BASE_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environ.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setattr(launching, 'run_launcher', lambda *args: pytest.fail('launched'))
    assert main(['run', str(REPO / DEMO), '--set', 'global_train_batch_size=4', *options]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert err.startswith('thaw run: invalid ') and err.count('\n') == 1 and error in err, err


def test_the_layout_comes_from_the_options_and_else_composers_environment_variables():
    assert node_layout(environ={}) == NodeLayout()
    slurm = {'WORLD_SIZE': '8', 'LOCAL_WORLD_SIZE': '2', 'NODE_RANK': '3', 'MASTER_ADDR': 'n0', 'MASTER_PORT': '29500'}
    assert node_layout(environ=slurm) == NodeLayout(2, 4, 3, 'n0', 29500)
    assert node_layout(nproc='4', node_rank='1', environ=slurm) == NodeLayout(4, 2, 1, 'n0', 29500)  # options win
    assert node_layout(environ={'WORLD_SIZE': '2', 'LOCAL_WORLD_SIZE': '2'}) == NodeLayout(2)  # as Composer reads it
    assert node_layout(nproc=2, environ={'WORLD_SIZE': '4', 'BASE_RANK': '2', **NODE_ENV}).node_rank == 1
    layout = NodeLayout(2, 2, 1, 'n0', 29500)
    assert launching.launcher_command(layout, ['run', 'r.yaml'])[1:] == [
        '-m', 'composer_thaw.recipes.node_launcher', '-n', '2', '--world_size', '4', '--node_rank', '1',
        '--base_rank', '2', '--master_addr', 'n0', '--master_port', '29500', '-m', 'composer_thaw.cli', 'run', 'r.yaml',
    ]  # fmt: skip
    assert resume_commands(['thaw', 'run', 'r.yaml'], layout) == [
        f'thaw run r.yaml --nproc 2 --nnodes 2 --node-rank {rank} --master-addr n0 --master-port 29500'
        for rank in (0, 1)
    ]
    assert resume_commands(['thaw', 'run', 'r.yaml'], NodeLayout(2)) == ['thaw run r.yaml --nproc 2']


# Composer's launcher runs this as each rank: it says it is ready, then plays its part (argv[1]).
STAND_IN_RANK = """
import os, pathlib, signal, sys, time
from composer_thaw.recipes.launching import STOP_REPORTS, StopReport, write_stop_report
rank, part, folder = int(os.environ['RANK']), sys.argv[1], pathlib.Path(sys.argv[2])
def stop(number, frame):
    write_stop_report(os.environ[STOP_REPORTS], rank, StopReport(number, 8, 'ep0-ba8'))
    sys.exit(128 + number)
signal.signal(signal.SIGTERM, signal.SIG_IGN if part == 'stubborn' else stop)
(folder / f'ready{rank}').write_text('')
if part == 'crash' and rank == 1:
    print('rank 1 fails here', file=sys.stderr)
    sys.exit(1)
if part == 'stopped elsewhere':  # another node was signalled: every rank stops at the same batch
    stop(signal.SIGTERM, None)
time.sleep(120)
"""


LAUNCH_VARIABLES = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT')


def _shell_env(**extra: str) -> dict[str, str]:
    """This process's environment without the launcher's variables, as a fresh shell on a node has it: an earlier
    test's single-process Trainer may have had Composer fill in RANK=0, WORLD_SIZE=1, ... here."""
    return {name: value for name, value in os.environ.items() if name not in LAUNCH_VARIABLES} | extra


def _launch_stand_ins(part: str, folder: Path) -> subprocess.Popen:
    """The node launcher with 2 stand-in ranks, in a session of its own (as ``thaw run`` starts it)."""
    (folder / 'rank.py').write_text(STAND_IN_RANK)
    (folder / 'reports').mkdir()
    env = _shell_env(PYTHONPATH=str(REPO), **{launching.STOP_REPORTS: str(folder / 'reports')})
    command = [sys.executable, '-m', launching.NODE_LAUNCHER, '-n', '2', str(folder / 'rank.py'), part, str(folder)]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _wait_ready(launcher: subprocess.Popen, folder: Path) -> None:
    deadline = time.monotonic() + 120
    while not all((folder / f'ready{rank}').exists() for rank in (0, 1)):
        assert launcher.poll() is None and time.monotonic() < deadline, 'the stand-in ranks did not start'
        time.sleep(0.1)


@pytest.mark.multiprocess  # Composer's launcher, 2 processes
@pytest.mark.parametrize('part', ['signalled', 'stopped elsewhere'])
def test_the_node_launcher_is_quiet_when_its_ranks_stop_on_an_interruption(part, tmp_path):
    launcher = _launch_stand_ins(part, tmp_path)
    if part == 'signalled':
        _wait_ready(launcher, tmp_path)
        launcher.send_signal(signal.SIGINT)  # what `thaw run` passes on
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGTERM and output == ''
    assert sorted(path.name for path in (tmp_path / 'reports').iterdir()) == ['rank0.json', 'rank1.json']


@pytest.mark.multiprocess  # Composer's launcher, 2 processes
def test_a_second_signal_kills_the_ranks_that_have_not_stopped(tmp_path):
    launcher = _launch_stand_ins('stubborn', tmp_path)
    _wait_ready(launcher, tmp_path)
    launcher.send_signal(signal.SIGINT)
    time.sleep(1)
    launcher.send_signal(signal.SIGINT)
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGKILL and output == ''


@pytest.mark.multiprocess  # Composer's launcher, 2 processes
def test_a_failed_rank_gets_composers_own_error_output(tmp_path):
    launcher = _launch_stand_ins('crash', tmp_path)
    output, _ = launcher.communicate(timeout=180)
    assert launcher.returncode == 1, output  # the failed rank's status
    assert 'Rank 1 crashed with exit code 1' in output and 'rank 1 fails here' in output  # its STDERR, which
    assert 'Global rank 1 (PID' in output  # Composer's launcher keeps in a file unless the rank fails


# 2 nodes of 1 process on localhost: a tiny decoder, a checkpoint every 3 batches, many batches to stop in.
NODES_RUN = [*TINY_HIFT_RUN, 'data.max_train_samples=16', 'save_interval=3ba', 'max_duration=2000ba', 'run_name=nodes']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _start_nodes(commands: list[list[str]], folder: Path, name: str) -> list[subprocess.Popen]:
    """Each command (one node's ``thaw run``) in the background, in a session of its own; output in
    ``folder/<name><node>.log``."""
    env = _shell_env(OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore', HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    nodes = []
    for rank, command in enumerate(commands):
        with (folder / f'{name}{rank}.log').open('w') as log:
            nodes.append(
                subprocess.Popen(
                    command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    return nodes


def _stop_all(nodes: list[subprocess.Popen]) -> None:
    for node in nodes:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)


@pytest.fixture(scope='module')
def interrupted_nodes(tmp_path_factory) -> dict:
    """Two nodes started as the README says; SIGTERM to node 1's ``thaw run`` once the first checkpoint is written."""
    folder = tmp_path_factory.mktemp('nodes')
    runs = folder / 'runs'
    options = ['--nproc', '1', '--nnodes', '2', '--master-addr', '127.0.0.1', '--master-port', str(_free_port())]
    command = [str(THAW), 'run', DEMO, *set_args([*NODES_RUN, f'save_folder={runs}']), *options]
    nodes = _start_nodes([[*command, '--node-rank', str(rank)] for rank in (0, 1)], folder, 'interrupted')
    try:
        deadline = time.monotonic() + 900  # the suite's launches share the machine meanwhile
        while not (runs / 'ep0-ba3-rank0.pt').exists():
            assert all(node.poll() is None for node in nodes), 'a node ended before the first checkpoint'
            assert time.monotonic() < deadline, 'no checkpoint within 900 s'
            time.sleep(0.2)
        family = [p.pid for node in nodes for p in psutil.Process(node.pid).children(recursive=True)]
        nodes[1].send_signal(signal.SIGTERM)
        codes = [node.wait(timeout=600) for node in nodes]
    finally:
        _stop_all(nodes)
    logs = [(folder / f'interrupted{rank}.log').read_text() for rank in (0, 1)]
    return {'folder': folder, 'runs': runs, 'codes': codes, 'logs': logs, 'family': family}


def _latest_batch(runs: Path) -> int:
    return int(re.search(r'-ba(\d+)-', os.readlink(runs / 'latest-rank0.pt')).group(1))


@pytest.mark.multiprocess
def test_sigterm_to_one_node_saves_once_and_every_node_prints_the_commands_that_resume_last(interrupted_nodes):
    assert interrupted_nodes['codes'] == [128 + signal.SIGTERM] * 2
    assert not [pid for pid in interrupted_nodes['family'] if psutil.pid_exists(pid)], 'a process was left'
    runs = interrupted_nodes['runs']
    batch = _latest_batch(runs)
    saved = sorted(int(re.search(r'ba(\d+)', path.name).group(1)) for path in runs.glob('ep*-ba*-rank0.pt'))
    assert saved == sorted({*range(3, batch + 1, 3), batch})  # every 3 batches, and once where it stopped
    commands = []
    for node, log in enumerate(interrupted_nodes['logs']):
        assert 'Traceback' not in log and 'exited with code' not in log, log[-3000:]
        *_, message, first, last = log.rstrip('\n').splitlines()
        assert message.startswith(f'thaw run: interrupted by SIGTERM after batch {batch}; saved ') and message.endswith(
            f'continue from the latest one with these 2 commands, each on its node (this is node {node}):'
        ), message
        assert re.search(rf'/ep\d+-ba{batch}-rank0\.pt\. ', message), message
        commands.append([first, last])
    assert commands[0] == commands[1]
    for rank, line in enumerate(commands[0]):
        assert line.startswith(f'thaw run {DEMO} ') and f'--node-rank {rank} ' in line and 'autoresume=true' in line


@pytest.mark.multiprocess
def test_the_printed_commands_resume_the_run_on_both_nodes(interrupted_nodes):
    folder, runs = interrupted_nodes['folder'], interrupted_nodes['runs']
    lines = interrupted_nodes['logs'][0].rstrip('\n').splitlines()[-2:]
    batch = _latest_batch(runs)
    # as printed (thaw is the venv's), trained 2 more batches
    commands = [[str(THAW), *shlex.split(line)[1:], '--set', f'max_duration={batch + 2}ba'] for line in lines]
    nodes = _start_nodes(commands, folder, 'resumed')
    try:
        codes = [node.wait(timeout=900) for node in nodes]
    finally:
        _stop_all(nodes)
    logs = [(folder / f'resumed{rank}.log').read_text() for rank in (0, 1)]
    assert codes == [0, 0], logs
    assert f'(batch {batch})' in logs[0] and re.search(r'trained in this run +\| 2\b', logs[0]), logs[0]
    assert list(runs.glob(f'ep*-ba{batch + 2}-rank0.pt'))


def test_each_node_writes_its_own_autoresume_signal_file(monkeypatch):
    """Composer names the file rank 0 chose on every node (its broadcast includes node 0's rank); two nodes sharing
    the save folder then both remove it, and the second fails (composer_thaw.utils.node_signal_files)."""
    from composer.utils import dist

    from composer_thaw.utils.node_signal_files import per_node_signal_files

    def from_rank_zero(objects: list, src: int = 0) -> None:
        objects[0] = '._signal_file_node0_Ab12Cd'

    monkeypatch.setenv('NODE_RANK', '1')
    monkeypatch.setattr(dist, 'broadcast_object_list', from_rank_zero)
    assert dist.get_node_signal_file_name() == '._signal_file_node0_Ab12Cd'  # Composer's, on node 1
    with per_node_signal_files():
        assert dist.get_node_signal_file_name() == '._signal_file_node1_Ab12Cd'
    assert dist.get_node_signal_file_name() == '._signal_file_node0_Ab12Cd'
