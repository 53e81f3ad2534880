"""Part of the 4-process launch (tests/four_processes.py, two "nodes" of 2 processes): conformance cases under hybrid
sharding (HSDP: 2 replicas x 2 shards, :class:`composer_thaw.utils.hybrid_sharding.HSDPConfig`).

For each algorithm's last example: a run of 2 epochs (8 AdamW steps at ``SHARDED_LR``). Then the low-precision
mode: each case of ``master_weights_cases()`` on a bf16 model for 8 steps, checked by ``MasterCheck`` and
``MasterReference`` at every step, saved at step 2 and resumed (``fsdp2_script.masters_case``): the HSDP resume of
every algorithm, its own state and the masters included, is checked there, once (4 processes cost the suite more
than 2). Writes, from rank 0, ``<out>/results.json`` and ``<out>/<case id>.pt`` (the whole parameters at the end);
the master-weights checkpoints stay in ``<out>/master-weights`` for the elastic resumes at 2 processes
(tests/elastic_resumes.py).
"""

import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests folder, for `conformance.harness`

import torch
from composer.utils import dist

from composer_thaw.utils.hybrid_sharding import HSDPConfig
from conformance.fsdp2_script import fit, masters_case
from conformance.harness import last_cases, master_weights_cases

REPLICAS = 2
HSDP = functools.partial(HSDPConfig, data_parallel_replicate_degree=REPLICAS)


def main(out: Path) -> None:
    results: dict = {}
    for case in last_cases():
        params, all_sharded, record = fit(case, sharding=HSDP)
        if dist.get_global_rank() == 0:
            torch.save(params, out / f'{case.id}.pt')
        results[case.id] = {'all_parameters_sharded': all_sharded, 'optimizer': record}
    results['master_weights'] = {
        case.id: masters_case(case, out / 'master-weights' / case.id, sharding=HSDP) for case in master_weights_cases()
    }
    if dist.get_global_rank() == 0:
        (out / 'results.json').write_text(json.dumps(results, indent=2))
