"""Run by ``composer -n 2`` once per test session (the first of tests/launches.py): every 2-process check of the suite
in one launch.

Starting two processes that import torch, Composer and transformers costs more than most of the checks, so the
``two_processes`` fixture (tests/conftest.py) launches this script once and the tests read what each part wrote:

* ``<out>/ddp``: the conformance suite under DDP (conformance/ddp_script.py);
* ``<out>/fsdp2``: the conformance suite sharded with FSDP2 (conformance/fsdp2_script.py); the second argument is
  the unsharded single-process checkpoint it loads;
* ``<out>/<algorithm>/result.json``: each algorithm's own DDP check (``<algorithm>/ddp_check.py``);
* ``<out>/master_weights/result.json``: low-precision weights with fp32 masters under DDP
  (``master_weights_ddp_check.py``);
* ``<out>/sharded_recipe/summary.json``: ``yamls/sharded_decoder.yaml``, reduced, run by ``thaw run`` in each
  process, as ``thaw run --nproc 2`` has the launcher do;
* ``<out>/interruption/result.json``: SIGTERM to one rank of a DDP ``thaw run`` (``interruption_ddp_check.py``).

A part that raises writes its traceback to ``<out>/<part>/error-rank<r>.txt`` and the next part runs, so one failure
fails only its own tests.
"""

import gc
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tests folder

from composer.utils import dist
from support import release_trainers

ALGORITHM_CHECKS = ('layer_freezing', 'regex_freeze', 'lora_inject', 'hift_rotation')


def parts(out: Path, plain_checkpoint: str) -> dict[str, Callable[[Path], None]]:
    """Each part's name and how to run it into its folder."""
    import importlib

    from conformance import ddp_script, fsdp2_script

    runs: dict[str, Callable[[Path], None]] = {
        'ddp': ddp_script.main,
        'fsdp2': lambda folder: fsdp2_script.main(folder, plain_checkpoint),
    }
    for name in ALGORITHM_CHECKS:
        check = importlib.import_module(f'{name}.ddp_check')
        runs[name] = lambda folder, check=check: check.main(str(folder / 'result.json'), str(folder / 'checkpoints'))
    masters = importlib.import_module('master_weights_ddp_check')  # master_weights='fp32' under DDP
    runs['master_weights'] = lambda folder: masters.main(str(folder / 'result.json'), str(folder / 'checkpoints'))
    runs['sharded_recipe'] = sharded_recipe
    runs['interruption'] = importlib.import_module('interruption_ddp_check').main  # SIGTERM to one rank
    return runs


SHARDED_RECIPE = [
    'max_duration=2ba',
    'global_train_batch_size=4',
    'data.max_train_samples=16',
    'data.max_eval_samples=8',
    'eval_interval=2ba',
    'progress_bar=false',
]


def sharded_recipe(folder: Path) -> None:
    """What each process of ``thaw run yamls/sharded_decoder.yaml --nproc 2`` runs (``composer_thaw.cli._launch``)."""
    from support import set_args

    from composer_thaw.cli import main

    overrides = [*SHARDED_RECIPE, f'summary_path={folder / "summary.json"}']
    code = main(['run', 'yamls/sharded_decoder.yaml', *set_args(overrides)])
    if code != 0:
        raise RuntimeError(f'thaw run exited {code}')


def run_parts(out: Path, runs: dict[str, Callable[[Path], None]]) -> None:
    """Run each part into ``out/<name>``; a part that raises writes its traceback to ``error-rank<r>.txt`` there and
    the next part runs (every rank waits for the others between parts)."""
    for name, run in runs.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            run(folder)
        except Exception:
            (folder / f'error-rank{dist.get_global_rank()}.txt').write_text(traceback.format_exc())
        release_trainers()  # the part's models and optimizers are freed before the next part
        gc.collect()
        dist.barrier()


if __name__ == '__main__':
    run_parts(Path(sys.argv[1]), parts(Path(sys.argv[1]), sys.argv[2]))
