"""Elastic resume: a sharded checkpoint written at one world size resumes at another, 2 -> 1, 2 -> 4 and 4 -> 2
(tests/launches.py; the 4-process runs are two nodes of 2). For every algorithm the resumed run ends where one
process ends (the sharded tolerance, which an uninterrupted run at any of these sizes meets too), with frozen
elements bit-identical and optimizer state for what one process's optimizer holds, sharded over the new world size:
frozen sets, HiFT's group and offloaded state, LoRA adapters and RegexFreeze's rows land on the new layout. In the
low-precision mode the fp32 masters (4 -> 2: written under HSDP) land on it too, checked at every step after the
load, and end where the uninterrupted run that wrote the checkpoint ends."""

import json
from pathlib import Path

import pytest
import torch
from support import two_process_part

from conformance.harness import (
    SHARDED_MAX_DIFF,
    SHARDED_MEAN_DIFF,
    assert_like_one_process,
    assert_optimizer_state_sharded,
    ids,
    last_cases,
    master_weights_cases,
)

LAST = last_cases()
MASTER_CASES = master_weights_cases()
RESUMES = ['2->1', '2->4', '4->2']


@pytest.fixture(scope='module')
def elastic_runs(two_processes, four_processes, elastic_resumes) -> dict[str, tuple[Path, Path]]:
    """Per resume: the folder of the runs resumed at the new size, and the folder of the master-weights runs that
    wrote the checkpoints (``<case id>/straight.pt``)."""
    written_at_2 = two_processes / 'fsdp2' / 'sharded-checkpoints' / 'master-weights'
    return {
        '2->1': (two_process_part(elastic_resumes[1], 'elastic'), written_at_2),
        '2->4': (two_process_part(four_processes, 'elastic'), written_at_2),
        '4->2': (two_process_part(elastic_resumes[2], 'elastic'), four_processes / 'hsdp' / 'master-weights'),
    }


@pytest.mark.multiprocess
@pytest.mark.parametrize('resume', RESUMES)
@pytest.mark.parametrize('case', LAST, ids=ids(LAST))
def test_a_resume_at_another_world_size_ends_like_one_process(case, resume, elastic_runs):
    out, _ = elastic_runs[resume]
    results = json.loads((out / 'results.json').read_text())
    assert results['world_size'] == int(resume.split('->')[1])
    result = results[case.id]
    assert result['all_parameters_sharded']
    assert result['optimizer']['mesh_shape'] == [results['world_size']]
    assert_like_one_process(torch.load(out / f'{case.id}.pt'), case, f'run resumed {resume}')
    assert_optimizer_state_sharded(result['optimizer'], case)


@pytest.mark.multiprocess
@pytest.mark.parametrize('case', LAST, ids=ids(LAST))
def test_an_uninterrupted_run_at_four_processes_ends_like_one_process(case, elastic_runs):
    """The reference the resumes at 4 are held to: straight runs at 4 (which wrote the 4 -> 2 checkpoints)."""
    out, _ = elastic_runs['2->4']
    assert_like_one_process(torch.load(out / f'straight-{case.id}.pt'), case, 'run at 4 processes')


@pytest.mark.multiprocess
@pytest.mark.parametrize('resume', RESUMES)
@pytest.mark.parametrize('case', MASTER_CASES, ids=ids(MASTER_CASES))
def test_fp32_masters_resume_at_another_world_size(case, resume, elastic_runs):
    out, written_by = elastic_runs[resume]
    result = json.loads((out / 'results.json').read_text())['master_weights'][case.id]
    assert result['steps'] == 6 and result['failures'] == [], 'MasterCheck failed after the load'
    assert result['masters_sharded']
    resumed = torch.load(out / f'master-weights-{case.id}.pt')
    straight = torch.load(written_by / case.id / 'straight.pt')
    assert resumed['masters'].keys() == straight['masters'].keys() != set()
    differences = torch.cat(
        [(resumed['masters'][name] - value).abs().flatten() for name, value in straight['masters'].items()]
    )
    assert differences.max() <= SHARDED_MAX_DIFF and differences.mean() <= SHARDED_MEAN_DIFF, (
        f'masters resumed {resume} differ from the uninterrupted run by up to {differences.max():.2e}'
    )
