"""Elastic resume: sharded checkpoints written at one world size, resumed at another (the conformance cases).

Run inside a launch of any size (tests/launches.py): for each algorithm's last example, a resume of the 2-epoch run's
sharded checkpoint after epoch 1 (``<runs_from>/<case id>/ep1-ba4``, written by ``fsdp2_script.fit``) up to the end;
for each master-weights case, a resume of its checkpoint at step 2 (``<masters_from>/<case id>/ep0-ba2``, written by
``fsdp2_script.masters_case``) up to step 8, checked by ``MasterCheck`` at each step. Writes, from rank 0,
``<out>/results.json`` (the optimizer's record and the master checks), ``<out>/<case id>.pt`` (the whole parameters
at the end) and ``<out>/master-weights-<case id>.pt`` (the whole bf16 weights and fp32 masters at the end).

With ``save_to``, it first runs each last example straight at this size, saving its checkpoints there (the runs
that resume at another size start from them).
"""

import json
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests folder, for `conformance.harness`

import torch
from composer.utils import dist

from conformance.fsdp2_script import fit, fit_bf16_with_masters
from conformance.harness import last_cases, master_weights_cases


def main(out: Path, runs_from: Path, masters_from: Path, save_to: Optional[Path] = None) -> None:
    rank0 = dist.get_global_rank() == 0
    results: dict = {'world_size': dist.get_world_size(), 'master_weights': {}}
    for case in last_cases():
        if save_to is not None:
            straight, _, _ = fit(case, save_folder=str(save_to / case.id), save_interval='1ep')
            if rank0:
                torch.save(straight, out / f'straight-{case.id}.pt')
        params, all_sharded, record = fit(case, load_path=str(runs_from / case.id / 'ep1-ba4'))
        if rank0:
            torch.save(params, out / f'{case.id}.pt')
        results[case.id] = {'all_parameters_sharded': all_sharded, 'optimizer': record}
    for case in master_weights_cases():
        weights, masters, _, check = fit_bf16_with_masters(case, load_path=str(masters_from / case.id / 'ep0-ba2'))
        if rank0:
            torch.save({'weights': weights, 'masters': masters}, out / f'master-weights-{case.id}.pt')
        results['master_weights'][case.id] = {
            'steps': check.steps,
            'failures': check.failures,
            'masters_sharded': all(check.sharded),
        }
    if rank0:
        (out / 'results.json').write_text(json.dumps(results, indent=2))
