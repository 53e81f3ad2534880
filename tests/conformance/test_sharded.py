"""3b: under Composer's FSDP2 at world size 2 (gloo on CPU, one launch for every case) each case trains like one
unsharded process, keeps frozen elements bit-identical, holds sharded optimizer state only for what trains, and
resumes bit-identically from its checkpoints; an unsharded checkpoint loads into the sharded model. In the
low-precision mode (bf16 weights, ``master_weights='fp32'``) the masters are sharded like their weights, exist only
for what trains and resume bit-identically. The previews
and LoRAInject's exports of a sharded model equal those of an unsharded one. FSDP1 is refused before training,
naming FSDP2."""

import json

import pytest
import torch
from support import part_results

from conformance.harness import (
    SHARDED_MAX_DIFF,
    SHARDED_MEAN_DIFF,
    assert_like_one_process,
    assert_masters_case_passed,
    assert_optimizer_state_sharded,
    first_and_last_cases,
    first_cases,
    ids,
    last_cases,
    make_trainer,
    master_weights_cases,
    parameters,
    sgd_trainer,
    tiny_model,
)

CASES = first_and_last_cases()  # every example under DDP; the ends here, where a launch costs more


@pytest.fixture(scope='module')
def sharded_results(two_processes):
    return part_results(two_processes, 'fsdp2')


@pytest.mark.multiprocess
@pytest.mark.parametrize('case', CASES, ids=ids(CASES))
def test_sharded_training_matches_one_process(case, sharded_results):
    out, results = sharded_results
    result = results[case.id]
    assert result['all_parameters_sharded'], 'FSDP2 left parameters unsharded'
    assert result['optimizer']['mesh_shape'] == [2]
    assert_like_one_process(torch.load(out / f'{case.id}.pt'), case)
    assert_optimizer_state_sharded(result['optimizer'], case)


FIRST = first_cases()
LAST = last_cases()


@pytest.mark.multiprocess
@pytest.mark.parametrize('case', LAST, ids=ids(LAST))
def test_sharded_and_full_checkpoints_resume_exactly(case, sharded_results):
    result = sharded_results[1][case.id]
    assert result['resume_exact_sharded'], 'resuming from a sharded checkpoint changed the result'
    assert result['resume_exact_full'], 'resuming from a full checkpoint changed the result'


@pytest.mark.multiprocess
@pytest.mark.parametrize('name', ['layer_freezing', 'hift_rotation'])
def test_sharded_checkpoints_hold_state_only_for_what_trained(name, sharded_results):
    """The resumed checkpoints above are ones where some parameters had no optimizer state when they were saved
    (frozen units, HiFT's inactive groups): a fresh optimizer would have state for every parameter."""
    result = sharded_results[1][next(case.id for case in LAST if case.name == name)]
    assert 0 < result['parameters_with_state_in_checkpoint'] < result['parameters']


@pytest.mark.multiprocess
@pytest.mark.parametrize('case', FIRST, ids=ids(FIRST))
def test_an_unsharded_checkpoint_loads_into_a_sharded_model(case, sharded_results):
    assert sharded_results[1][case.id]['weights_only_load_max_diff'] == 0.0


MASTER_CASES = master_weights_cases()


@pytest.mark.multiprocess
@pytest.mark.parametrize('case', MASTER_CASES, ids=ids(MASTER_CASES))
def test_bf16_weights_with_sharded_fp32_masters_train_and_resume_exactly(case, sharded_results):
    """The conformance suite's master-weights cases (test_master_weights.py) under FSDP2: MasterCheck and the fp32
    reference (each rank replaying its shards) after each of 8 steps, then a resume from the sharded checkpoint at
    step 2."""
    assert_masters_case_passed(sharded_results[1]['master_weights'][case.id], case, shards=2)


@pytest.mark.multiprocess
def test_previews_of_a_sharded_model_equal_the_unsharded_ones(sharded_results):
    from composer_thaw.hift_rotation.preview import rotation_preview
    from composer_thaw.regex_freeze.preview import freeze_preview
    from conformance.fsdp2_script import PREVIEW_PATTERNS

    previews = sharded_results[1]['previews']
    assert previews['freeze'] == freeze_preview(tiny_model(), PREVIEW_PATTERNS)
    assert previews['rotation'] == rotation_preview(tiny_model(), group_size=2)


@pytest.mark.multiprocess
def test_lora_exports_of_a_sharded_model_equal_the_unsharded_ones(sharded_results, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from conformance.fsdp2_script import export_lora

    sharded, single = sharded_results[0] / 'lora-export', tmp_path / 'single'
    export_lora(single)
    for folder in ('adapter', 'merged'):
        names = [sorted(p.name for p in (run / folder).iterdir()) for run in (sharded, single)]
        assert names[0] == names[1]
    config = 'adapter/adapter_config.json'
    assert json.loads((sharded / config).read_text()) == json.loads((single / config).read_text())
    for weights in ('adapter/adapter_model.safetensors', 'merged/model.safetensors'):
        ours, reference = load_file(sharded / weights), load_file(single / weights)
        assert ours.keys() == reference.keys()
        differences = torch.cat([(ours[key] - value).abs().flatten() for key, value in reference.items()])
        assert differences.max() <= SHARDED_MAX_DIFF and differences.mean() <= SHARDED_MEAN_DIFF
    merged = AutoModelForCausalLM.from_pretrained(sharded / 'merged')
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in tiny_model().model.parameters())


@pytest.mark.parametrize('case', FIRST, ids=ids(FIRST))
def test_fsdp1_is_refused_before_training_naming_fsdp2(case):
    algorithm = case.build()
    with pytest.raises(NotImplementedError, match='FSDP2Config'):
        make_trainer([algorithm], parallelism_config={'fsdp': {'use_orig_params': True}})


@pytest.mark.multiprocess
def test_fsdp2_on_gloo_averages_gradients_as_one_process_would(sharded_results):
    """Issue #24: gloo sums where FSDP2 asks for an average, so on CPU every gradient was world_size times a single
    process's. After our algorithms' INIT (utils.sharding.average_gradients_on_gloo) 8 sharded SGD steps equal 8
    steps in one process to rounding; SGD shows a gradient's scale where AdamW hides it."""
    out, results = sharded_results
    assert results['sgd_averaged'], "the algorithms' INIT did not make FSDP2 average on gloo"
    single = sgd_trainer()
    single.fit()
    expected = parameters(single)
    single.close()
    sharded = torch.load(out / 'sgd.pt')
    assert sharded.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(
            sharded[name], value, atol=1e-6, rtol=0, msg=f'{name} differs: gradients not averaged'
        )
