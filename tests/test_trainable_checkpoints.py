"""Trainable-only checkpoints (composer_thaw.utils.trainable_checkpoints): LoRAInject writes them by default,
RegexFreeze on
request. They hold the trainable tensors and a fingerprint of the frozen ones, resume bit-exactly on the model as
built, load with load_weights_only and strictly, and refuse frozen weights that differ, naming the tensor."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from support import cpu_trainer, seeded_tiny_decoder
from torch import nn

from composer_thaw.lora_inject import LoRAInject, apply_lora, frozen_base_parameters, merged_state_dict_view
from composer_thaw.regex_freeze import RegexFreeze
from composer_thaw.utils.parameter_selection import user_module
from composer_thaw.utils.trainable_checkpoints import (
    FINGERPRINT_KEY,
    FrozenWeightsMismatch,
    checkpoint_trainable_only,
    install_for_trainer,
    tensor_fingerprint,
)

LORA = dict(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'], use_dora=True, lora_dropout=0.1)
ROWS = ['model.embed_tokens.weight[100:200]', 'model.layers.1', 'model.norm']


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in user_module(model).named_parameters()}


def _model_state(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=False)['state']['model']


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory):
    """An uninterrupted 2-batch LoRAInject run with the default checkpoints, saved after batch 1 and 2."""
    folder = tmp_path_factory.mktemp('lora')
    model = seeded_tiny_decoder(num_layers=2)
    trainer = cpu_trainer(model, [LoRAInject(**LORA)], max_duration='2ba', save_folder=str(folder), save_interval='1ba')
    trainer.fit()
    return SimpleNamespace(folder=folder, final=_params(model), trainer=trainer)


def test_a_lora_checkpoint_holds_the_adapters_and_a_fingerprint_of_each_frozen_tensor(lora_run):
    state = _model_state(lora_run.folder / 'ep0-ba1-rank0.pt')
    hf = user_module(lora_run.trainer.state.model)
    trainable = {f'model.{n}' for n, p in hf.named_parameters() if p.requires_grad}
    frozen = {f'model.{n}': p for n, p in hf.named_parameters(remove_duplicate=False) if not p.requires_grad}
    tensors = {k for k, v in state.items() if isinstance(v, torch.Tensor)}
    buffers = {f'model.{n}' for n, _ in hf.named_buffers()} & tensors
    assert tensors == trainable | buffers
    fingerprints = state[FINGERPRINT_KEY]['frozen']
    assert fingerprints.keys() == frozen.keys()
    assert all(fingerprints[k] == tensor_fingerprint(p) for k, p in frozen.items())  # frozen: unchanged by training
    full = lora_run.trainer.state.model.model.state_dict()  # Hugging Face code still sees every weight
    assert 'model.layers.0.self_attn.q_proj.base_layer.weight' in full and 'lm_head.weight' in full
    with merged_state_dict_view(lora_run.trainer.state.model):  # and the plain model's, merged, for an export
        merged = lora_run.trainer.state.model.model.state_dict()
    assert 'model.layers.0.self_attn.q_proj.weight' in merged and not [k for k in merged if 'lora_' in k]


def test_resuming_on_the_model_as_built_is_bit_identical(lora_run):
    resumed = seeded_tiny_decoder(num_layers=2)  # the same source: same seed
    trainer = cpu_trainer(
        resumed, [LoRAInject(**LORA)], max_duration='2ba', load_path=str(lora_run.folder / 'ep0-ba1-rank0.pt')
    )
    trainer.fit()
    for name, value in _params(resumed).items():
        assert torch.equal(value, lora_run.final[name]), name
    optimizer = trainer.state.optimizers[0]
    assert {id(p) for p in optimizer.state} == {id(p) for p in resumed.parameters() if p.requires_grad}


def test_other_frozen_weights_are_refused_before_training_naming_the_tensor(lora_run):
    other = seeded_tiny_decoder(seed=1, num_layers=2)
    with pytest.raises(FrozenWeightsMismatch, match=r"frozen tensor 'model\.model\.embed_tokens\.weight'"):
        cpu_trainer(
            other, [LoRAInject(**LORA)], max_duration='2ba', load_path=str(lora_run.folder / 'ep0-ba1-rank0.pt')
        )


@pytest.mark.parametrize('strict', [False, True], ids=['lenient', 'strict'])
def test_load_weights_only_puts_the_trained_adapters_on_the_model_as_built(lora_run, strict):
    model = seeded_tiny_decoder(num_layers=2)
    cpu_trainer(
        model,
        [LoRAInject(**LORA)],
        max_duration='2ba',
        load_path=str(lora_run.folder / 'ep0-ba2-rank0.pt'),
        load_weights_only=True,
        load_strict_model_weights=strict,
    )
    for name, value in _params(model).items():
        assert torch.equal(value, lora_run.final[name]), name


def test_a_strict_load_still_reports_missing_trainable_tensors():
    source, target = seeded_tiny_decoder(num_layers=1), seeded_tiny_decoder(num_layers=1)
    for model in (source, target):
        apply_lora(model, r=2, target_modules=['q_proj'])
        checkpoint_trainable_only(model, owner='test')
    state = source.state_dict()
    del state['model.model.layers.0.self_attn.q_proj.lora_B']
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*q_proj\.lora_B'):
        target.load_state_dict(state)


def test_under_a_wrapper_the_keys_carry_its_prefix():
    model = seeded_tiny_decoder(num_layers=1)
    apply_lora(model, r=2, target_modules=['q_proj'])
    checkpoint_trainable_only(model, owner='test')
    wrapper = nn.ModuleDict({'module': model})  # as DDP nests it
    state = wrapper.state_dict()
    assert f'module.{FINGERPRINT_KEY}' in state and 'module.model.lm_head.weight' not in state
    fresh = seeded_tiny_decoder(num_layers=1)
    apply_lora(fresh, r=2, target_modules=['q_proj'])
    checkpoint_trainable_only(fresh, owner='test')
    nn.ModuleDict({'module': fresh}).load_state_dict(state)  # strict
    with torch.no_grad():
        fresh.model.lm_head.weight.add_(1)
    with pytest.raises(FrozenWeightsMismatch, match=r"'model\.lm_head\.weight'"):
        nn.ModuleDict({'module': fresh}).load_state_dict(state)


def test_after_loading_a_full_checkpoint_saves_are_full_again():
    source = seeded_tiny_decoder(seed=1, num_layers=1)
    model = seeded_tiny_decoder(num_layers=1)
    handler = checkpoint_trainable_only(model, owner='test')
    for p in model.parameters():
        p.requires_grad_(False)
    assert set(model.state_dict()) == {FINGERPRINT_KEY}
    with pytest.warns(UserWarning, match='frozen weights were loaded from a checkpoint'):
        model.load_state_dict(source.state_dict())
    assert handler.frozen_loaded and FINGERPRINT_KEY not in model.state_dict()
    assert set(model.state_dict()) == set(source.state_dict())


def test_regex_freeze_writes_them_on_request_and_resumes_bit_identically(tmp_path: Path):
    def run(**kwargs):
        model = seeded_tiny_decoder(num_layers=2)
        trainer = cpu_trainer(
            model, [RegexFreeze(trainable=ROWS, checkpoint_trainable_only=True)], max_duration='2ba', **kwargs
        )
        trainer.fit()
        return model

    uninterrupted = _params(run(save_folder=str(tmp_path), save_interval='1ba'))
    state = _model_state(tmp_path / 'ep0-ba1-rank0.pt')
    # row ranges keep the whole tensor; whole frozen tensors are fingerprinted
    assert 'model.model.embed_tokens.weight' in state and 'model.lm_head.weight' not in state
    assert 'model.model.layers.0.mlp.up_proj.weight' in state[FINGERPRINT_KEY]['frozen']
    resumed = _params(run(load_path=str(tmp_path / 'ep0-ba1-rank0.pt')))
    for name, value in resumed.items():
        assert torch.equal(value, uninterrupted[name]), name


def test_sharded_training_is_refused_when_asked_and_gets_full_checkpoints_by_default():
    state = SimpleNamespace(fsdp_config=object(), model=nn.Linear(2, 2))
    with pytest.raises(NotImplementedError, match=r'checkpoint_trainable_only=True\) does not support sharded'):
        install_for_trainer(state, LoRAInject(), True, default=True, frozen=list)
    assert not install_for_trainer(state, LoRAInject(), None, default=True, frozen=list).save_trainable_only


def test_adapters_another_algorithm_freezes_for_a_while_stay_in_checkpoints():
    # HiFTRotation(lora=True) trains one block's adapters at a time: the others, trained before, do not require grad
    model = seeded_tiny_decoder(num_layers=2)
    apply_lora(model, r=2, target_modules=['q_proj'])
    checkpoint_trainable_only(model, owner='LoRAInject', frozen=lambda: frozen_base_parameters(model))
    adapter = model.model.model.layers[0].self_attn.q_proj.lora_B
    with torch.no_grad():
        adapter.add_(1)
    adapter.requires_grad_(False)
    state = model.state_dict()
    assert torch.equal(state['model.model.layers.0.self_attn.q_proj.lora_B'], adapter)
    assert 'model.model.layers.0.self_attn.q_proj.base_layer.weight' in state[FINGERPRINT_KEY]['frozen']
