"""Part of the one 2-process launch (tests/two_processes.py): every conformance case under DDP at world size 2.

For each case: an uninterrupted run, a run saved after 2 epochs, and a resumption of it. Writes, from rank 0,
``<out>/results.json`` (per case: each rank's parameter checksum for the straight and resumed runs) and
``<out>/<case id>.pt`` (the straight run's final parameters, to compare with a single-process run).
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests folder, for `conformance.harness`

import torch
from composer.utils import dist

from composer_thaw.recipes.running import parameter_checksum
from conformance.harness import all_cases, make_trainer


def _fit(case, **kwargs):
    trainer = make_trainer([case.build()], **kwargs)
    trainer.fit()
    checksums = dist.all_gather_object(parameter_checksum(trainer.state.model))
    params = (
        {n: p.detach().clone() for n, p in trainer.state.model.module.model.named_parameters()}
        if hasattr(trainer.state.model, 'module')
        else None
    )
    trainer.close()
    return checksums, params


def main(out: Path) -> None:
    results = {}
    shared = Path(os.environ.get('THAW_DDP_TMP', out)) / 'checkpoints'
    for case in all_cases():
        straight, params = _fit(case)
        folder = shared / case.id
        _fit(case, save_folder=str(folder), save_interval='2ep')
        resumed, _ = _fit(case, load_path=str(folder / 'ep2-ba8-rank{rank}.pt'))
        results[case.id] = {'straight': straight, 'resumed': resumed}
        if dist.get_global_rank() == 0:
            torch.save(params, out / f'{case.id}.pt')
    if dist.get_global_rank() == 0:
        (out / 'results.json').write_text(json.dumps(results, indent=2))


if __name__ == '__main__':
    main(Path(sys.argv[1]))
