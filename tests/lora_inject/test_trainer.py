"""LoRAInject in Composer's Trainer: only adapters train, the base stays bit-identical, checkpoints resume exactly."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from support import cpu_trainer, seeded_tiny_decoder

from composer_thaw.core.state import STATE_VERSION_KEY
from composer_thaw.lora_inject import LoRAInject
from composer_thaw.lora_inject.injection import adapter_layers
from composer_thaw.utils.parameter_selection import user_module

OPTIONS = dict(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj', 'embed_tokens'], modules_to_save=['lm_head'])


def _params(model):
    return {n: p.detach().clone() for n, p in user_module(model).named_parameters()}


def test_a_trainer_run_changes_only_adapters_and_selected_modules():
    model = seeded_tiny_decoder(num_layers=2)
    base_before = _params(model)
    trainer = cpu_trainer(model, [LoRAInject(**OPTIONS)], max_duration='4ba')
    after_init = _params(model)
    trainer.fit()
    after = _params(model)
    changed = {n for n in after if not torch.equal(after[n], after_init[n])}
    adapters = {n for n in after if n.endswith(('.lora_A', '.lora_B'))}
    assert changed <= adapters | {'lm_head.weight'} and 'lm_head.weight' in changed
    assert any(n.endswith('lora_B') for n in changed)
    for name, value in base_before.items():  # the base, now under .base_layer, is bit-identical
        ours = name if name in after else name.rsplit('.', 1)[0] + '.base_layer.' + name.rsplit('.', 1)[1]
        if name != 'lm_head.weight':
            assert torch.equal(after[ours], value), name


def test_the_optimizer_trains_only_what_requires_grad_and_metrics_are_logged():
    model = seeded_tiny_decoder(num_layers=2)
    trainer = cpu_trainer(model, [LoRAInject(r=2, target_modules=['q_proj'])], max_duration='1ba')
    optimizer = trainer.state.optimizers[0]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g['params']}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    trainer.fit()
    assert trainer.logger is not None
    assert set(optimizer.state) == {p for g in optimizer.param_groups for p in g['params']}


def test_state_dict_is_versioned_and_a_different_configuration_is_refused():
    algorithm = LoRAInject(**OPTIONS)
    state = algorithm.state_dict()
    assert state[STATE_VERSION_KEY] == 1
    LoRAInject(**OPTIONS).load_state_dict(state)
    with pytest.raises(ValueError, match=r'lora_inject.r = 2: the checkpoint was trained with r = 4;'):
        LoRAInject(**{**OPTIONS, 'r': 2}).load_state_dict(state)
    with pytest.raises(ValueError, match='version 7'):
        LoRAInject(**OPTIONS).load_state_dict({**state, STATE_VERSION_KEY: 7})


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path: Path):
    # full checkpoints; trainable-only ones (the default): tests/test_trainable_checkpoints.py
    options = dict(**OPTIONS, use_dora=True, lora_dropout=0.1, checkpoint_trainable_only=False)
    uninterrupted = seeded_tiny_decoder(num_layers=2)
    cpu_trainer(
        uninterrupted, [LoRAInject(**options)], max_duration='6ba', save_folder=str(tmp_path), save_interval='3ba'
    ).fit()
    resumed = seeded_tiny_decoder(seed=1, num_layers=2)  # different weights: everything comes from the checkpoint
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        cpu_trainer(
            resumed, [LoRAInject(**options)], max_duration='6ba', load_path=str(tmp_path / 'ep0-ba3-rank0.pt')
        ).fit()
    assert not [w for w in caught if 'required_on_load' in str(w.message)]
    expected = _params(uninterrupted)
    for name, value in _params(resumed).items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize(
    'load_options, error',
    [
        # Composer fails loading the optimizer state of the (absent) adapters (torch 2.7); newer torch refuses first,
        # a trainable parameter without saved state (RuntimeError: Missing optimizer state).
        ({}, (KeyError, RuntimeError)),
        ({'load_weights_only': True}, RuntimeError),  # strict model loading: missing q_proj.weight, unexpected lora_A
    ],
)
def test_loading_a_lora_checkpoint_without_lora_inject_fails(tmp_path: Path, load_options, error):
    # Composer re-applies only its own surgery algorithms; the user must pass LoRAInject when resuming. (With
    # load_weights_only=True and load_strict_model_weights=False, Composer loads silently and drops the adapters.)
    cpu_trainer(
        seeded_tiny_decoder(num_layers=2),
        [LoRAInject(r=2, target_modules=['q_proj'])],
        max_duration='2ba',
        save_folder=str(tmp_path),
        save_interval='2ba',
    ).fit()
    with pytest.raises(error):
        cpu_trainer(
            seeded_tiny_decoder(num_layers=2),
            [],
            max_duration='2ba',
            load_path=str(tmp_path / 'ep0-ba2-rank0.pt'),
            **load_options,
        )


def test_fit_end_writes_the_adapter_and_the_merged_model(tmp_path: Path):
    import peft
    from transformers import AutoModelForCausalLM

    model = seeded_tiny_decoder(num_layers=2)
    base = seeded_tiny_decoder(num_layers=2).model.eval()
    algorithm = LoRAInject(
        r=2,
        target_modules=['q_proj', 'v_proj'],
        save_adapter_to=str(tmp_path / 'adapter'),
        save_merged_to=str(tmp_path / 'merged'),
    )
    cpu_trainer(model, [algorithm], max_duration='3ba').fit()
    assert json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())['r'] == 2
    ids = torch.randint(0, 1000, (2, 8))
    hf = user_module(model).eval()
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        from_peft = peft.PeftModel.from_pretrained(base, tmp_path / 'adapter')(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / 'merged').eval()(input_ids=ids).logits
    torch.testing.assert_close(from_peft, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-4)
    assert not any(layer.merged for layer in adapter_layers(hf).values())
