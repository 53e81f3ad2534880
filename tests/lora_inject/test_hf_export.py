"""The Hugging Face model's own state dict is the merged plain model's, so Hugging Face code that copies it into a
fresh model of the same class (``save_pretrained``; llm-foundry's ``hf_checkpointer``: ``type(model)(config)`` on
the meta device, then a strict ``load_state_dict(..., assign=True)``) gets a plain model computing what the adapted
one computes. Composer's checkpoints, the state dict of the model around it, keep the adapters."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from support import cpu_trainer, seeded_tiny_decoder
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from composer_thaw.lora_inject import (
    LoRAInject,
    apply_lora,
    expose_merged_state_dict,
    merge_adapters,
    merged_state_dict_view,
)
from composer_thaw.lora_inject.injection import adapter_layers
from composer_thaw.lora_inject.lora_inject import EXAMPLES
from composer_thaw.lora_inject.peft_format import merged_state_dict
from composer_thaw.utils.parameter_selection import user_module
from composer_thaw.utils.trainable_checkpoints import FINGERPRINT_KEY

IDS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
CASES: list[tuple[str, dict[str, Any]]] = [
    *(('llama', dict(example)) for example in EXAMPLES),
    ('llama', dict(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'], init='pissa')),
    ('gpt2', dict(r=2, lora_alpha=4, target_modules=['c_attn', 'c_fc'], enable_slices={'c_attn': [True, False, True]})),
]
IDS_OF_CASES = ['example0', 'example1-dora', 'example2-embedding-bias', 'pissa', 'gpt2-conv1d-slices']


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _trained_adapters(arch: str, lora: dict[str, Any]) -> nn.Module:
    """An adapted model whose adapters (and trained modules) moved away from their initialisation."""
    model = user_module(seeded_tiny_decoder(seed=0, arch=arch)).eval()
    apply_lora(model, **lora)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def _fresh_like_hf_checkpointer(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """What llm-foundry's hf_checkpointer does: a new model of the class on the meta device, loaded strictly."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        fresh = type(model)(copy.deepcopy(model.config))
    fresh.load_state_dict(state, assign=True)  # strict
    return fresh.eval()


@pytest.mark.parametrize(('arch', 'lora'), CASES, ids=IDS_OF_CASES)
def test_a_fresh_model_of_the_same_class_loads_the_state_dict_strictly_and_computes_the_same(arch, lora):
    model = _trained_adapters(arch, lora)
    expected = _logits(model)
    composer_view = set(model.state_dict())  # before: the training state, adapters apart
    assert any('.lora_A' in key for key in composer_view)
    with merged_state_dict_view(model), merged_state_dict_view(model):  # nested: one hook, removed once, at the end
        state = model.state_dict()
    assert not [key for key in state if 'lora_' in key or '.base_layer.' in key or 'pissa_initial' in key]
    fresh = _fresh_like_hf_checkpointer(model, state)
    torch.testing.assert_close(_logits(fresh), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(model), expected, atol=0, rtol=0)  # the adapted model is unchanged
    assert state.keys() == merged_state_dict(model).keys()
    assert set(model.state_dict()) == composer_view, 'outside the view the state dict holds the adapters again'


def test_a_merged_model_exposes_its_weights_once_merged():
    model = _trained_adapters('llama', dict(EXAMPLES[1]))
    expected = _logits(model)
    merge_adapters(model)
    handle = expose_merged_state_dict(model)
    fresh = _fresh_like_hf_checkpointer(model, model.state_dict())
    handle.remove()
    torch.testing.assert_close(_logits(fresh), expected, atol=1e-5, rtol=1e-5)


def test_save_pretrained_writes_a_plain_model_that_from_pretrained_loads(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    model = _trained_adapters('llama', dict(EXAMPLES[0]))
    with merged_state_dict_view(model) as hf_model:
        hf_model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-5, rtol=1e-5)


def test_under_lora_inject_the_export_view_is_the_merged_model_and_composer_checkpoints_keep_the_adapters():
    trainer = cpu_trainer(seeded_tiny_decoder(seed=0), [LoRAInject(**EXAMPLES[0])], max_duration='2ba')
    trainer.fit()
    hf_model = trainer.state.model.model.eval()
    assert any('.lora_A' in key for key in hf_model.state_dict()), "the model's own state dict keeps the adapters"
    with merged_state_dict_view(trainer.state.model):  # as merged_hf_checkpointer gathers it
        state = get_model_state_dict(hf_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    fresh = _fresh_like_hf_checkpointer(hf_model, state)
    torch.testing.assert_close(_logits(fresh), _logits(hf_model), atol=1e-5, rtol=1e-5)
    layers = adapter_layers(hf_model)
    assert layers and not any(layer.merged for layer in layers.values())  # nothing merged in place
    checkpointed = trainer.state.get_model_state_dict()  # what Composer saves: the adapters, the base fingerprinted
    frozen = checkpointed[FINGERPRINT_KEY]['frozen']
    for name in layers:
        assert {f'model.{name}.lora_A', f'model.{name}.lora_B'} <= set(checkpointed)
        assert f'model.{name}.base_layer.weight' in frozen and f'model.{name}.base_layer.weight' not in checkpointed


def test_llm_foundrys_plain_hf_checkpointer_is_refused_before_training_naming_the_merged_one(tmp_path: Path):
    pytest.importorskip('llmfoundry')
    from llmfoundry.callbacks import HuggingFaceCheckpointer

    from composer_thaw.lora_inject.llmfoundry_export import MergedHuggingFaceCheckpointer

    model = seeded_tiny_decoder(seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    plain = HuggingFaceCheckpointer(save_folder=str(tmp_path / 'hf'), save_interval='1ep')
    with pytest.raises(ValueError, match='merged_hf_checkpointer'):
        cpu_trainer(model, [LoRAInject(**EXAMPLES[0])], callbacks=[plain])
    assert dict(model.named_parameters()).keys() == before.keys(), 'no adapters were injected'
    merged = MergedHuggingFaceCheckpointer(save_folder=str(tmp_path / 'hf'), save_interval='1ep')
    cpu_trainer(seeded_tiny_decoder(seed=0), [LoRAInject(**EXAMPLES[0])], callbacks=[merged]).close()
