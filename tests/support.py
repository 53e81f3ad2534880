"""Small builders shared by tests: tiny models, loaders and Trainer runs on CPU."""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from composer import Trainer
from composer.core.engine import Engine
from composer.utils import reproducibility

from composer_thaw.datasets.builtin import LanguageModelingDataset, build_dataloader, python_topics_corpus
from composer_thaw.models.builtin import load_tokenizer, tiny_decoder

REPO = Path(__file__).resolve().parents[1]
# `thaw run yamls/demo.yaml` overrides for a run of a few seconds: a tiny decoder, HiFT (whose rotation state, queue and
# offloaded optimizer state, must resume), no evaluation before the end.
TINY_HIFT_RUN = [
    'model.name=tiny-decoder',
    'model.num_layers=2',
    'model.hidden_size=16',
    'model.num_heads=2',
    'data.name=python-topics',
    'data.max_seq_len=16',
    'global_train_batch_size=4',
    'data.max_eval_samples=4',
    'progress_bar=false',
    'eval_interval=100ba',
    'algorithms={hift_rotation: {group_size: 2}}',
]


def lm_loader(batch_size: int = 4, max_seq_len: int = 32, max_blocks: int = 64, split: int = 0):
    """A loader over the built-in language-modelling corpus (split 0 = train, 1 = eval)."""
    tokenizer = load_tokenizer()
    dataset = LanguageModelingDataset(python_topics_corpus()[split], tokenizer, max_seq_len, max_blocks)
    return build_dataloader(dataset, tokenizer, batch_size, shuffle=split == 0, drop_last=split == 0)


def seeded_tiny_decoder(seed: int = 0, **kwargs: Any):
    """``tiny_decoder`` initialized from ``seed``: the same call gives bit-identical weights."""
    reproducibility.seed_all(seed)
    return tiny_decoder(**{'hidden_size': 32, 'num_layers': 4, 'num_heads': 4, **kwargs})


def cpu_trainer(model, algorithms: Sequence = (), optimizer=None, max_duration: str = '6ba', **kwargs: Any) -> Trainer:
    """A quiet, seeded CPU Trainer on the LM corpus with AdamW unless told otherwise."""
    if optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    options = dict(
        train_dataloader=lm_loader(),
        max_duration=max_duration,
        device='cpu',
        progress_bar=False,
        log_to_console=False,
        seed=17,
    )
    options.update(kwargs)
    return Trainer(model=model, optimizers=optimizer, algorithms=list(algorithms), **options)


def release_trainers() -> None:
    """Let finished Trainers be freed: Composer registers every Trainer's engine with ``atexit``
    (``Engine._close(state, logger)``), which keeps each one's model, optimizer and dataloaders alive until the process
    exits."""
    atexit.unregister(Engine._close)


def set_args(overrides: Sequence[str]) -> list[str]:
    """``thaw run``'s arguments for recipe overrides: ``['a=1', 'b=2']`` -> ``['--set', 'a=1', '--set', 'b=2']``."""
    return [arg for override in overrides for arg in ('--set', override)]


def run_thaw(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the ``thaw`` CLI in a subprocess (as a user would), capturing output."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    return subprocess.run(
        [sys.executable, '-m', 'composer_thaw.cli', *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_launch(root: Path, plain_checkpoint: Path, until: str) -> subprocess.Popen:
    """Start the multi-process launches of the session (tests/launches.py) up to the one named ``until`` into
    ``root``, in the background, one after another (gloo on CPU, one thread a process); each writes
    ``root/<launch>/returncode`` when it ends (see :func:`wait_launch`)."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS='1',
        PYTHONWARNINGS='ignore',
        HF_HUB_OFFLINE='1',
        TRANSFORMERS_OFFLINE='1',
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / 'tests'), os.environ.get('PYTHONPATH', '')]),
    )
    command = [sys.executable, str(REPO / 'tests' / 'launches.py'), str(root), str(plain_checkpoint), until]
    # its own process group: stop_launch ends the launches and their ranks with it
    return subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdin=subprocess.DEVNULL)


def stop_launch(launch: subprocess.Popen) -> None:
    """SIGKILL what :func:`start_launch` started, if it still runs (a session that ended before it did)."""
    import signal

    if launch.poll() is None:
        os.killpg(launch.pid, signal.SIGKILL)


def wait_launch(folder: Path, timeout: int = 1800) -> None:
    """Wait for the launch of tests/launches.py that writes into ``folder`` (from any process); fail with its
    launchers' output unless it exited 0."""
    import time

    import pytest

    done, started = folder / 'returncode', time.monotonic()
    while not done.exists():
        if time.monotonic() - started > timeout:
            pytest.fail(f'the launch {folder.name} did not end within {timeout} s', pytrace=False)
        time.sleep(1)
    code = done.read_text().strip()
    if code != '0':
        logs = '\n'.join(log.read_text()[-8000:] for log in sorted(folder.glob('launch*.log')))
        pytest.fail(f'the launch {folder.name} exited {code}:\n{logs}', pytrace=False)


def two_process_part(out: Path, name: str) -> Path:
    """The folder of the part ``name`` of a multi-process launch (``out``: tests/two_processes.py's folder, or
    another of tests/launches.py); fails the calling test with the part's traceback if it raised."""
    import pytest

    errors = sorted((out / name).glob('error-rank*.txt'))
    if errors:
        pytest.fail(f'the part {name!r} of {out.name} raised:\n' + errors[0].read_text(), pytrace=False)
    return out / name


def part_results(out: Path, name: str) -> tuple[Path, dict]:
    """The folder of the part ``name`` of a multi-process launch and the ``results.json`` it wrote (see
    :func:`two_process_part`)."""
    import json

    folder = two_process_part(out, name)
    return folder, json.loads((folder / 'results.json').read_text())
