"""Adapters on disk: ours load in PEFT and PEFT's load in ours with equal outputs; merged export; own format."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from composer_thaw.lora_inject import apply_lora, export_merged, load_adapter, save_adapter
from composer_thaw.lora_inject.injection import adapter_layers
from composer_thaw.models.builtin import tiny_decoder

from .helpers import randomize_peft_adapters, randomize_trainable, tiny_hf_model


def _llama(hidden=32):
    torch.manual_seed(0)
    return tiny_decoder('llama', num_layers=2, hidden_size=hidden, num_heads=2).model.eval()


def _gpt2():
    torch.manual_seed(0)
    return tiny_decoder('gpt2', num_layers=2, hidden_size=32, num_heads=2).model.eval()


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.seq = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.conv(x).flatten(2)
        return self.head(self.seq(h).mean(-1))


def _inputs(model):
    torch.manual_seed(5)
    if isinstance(model, _ConvNet):
        return {'x': torch.randn(2, 3, 5, 5)}
    return {'input_ids': torch.randint(1, 100, (2, 10))}


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


CASES = {
    'llama-patterns': (
        _llama,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=['q_proj', 'v_proj', 'o_proj'],
            rank_pattern={'o_proj': 2},
            alpha_pattern={'v_proj': 3},
            use_rslora=True,
        ),
    ),
    'llama-dora-embedding': (_llama, dict(r=2, lora_alpha=4, target_modules=['embed_tokens', 'q_proj'], use_dora=True)),
    'llama-layers': (_llama, dict(r=2, lora_alpha=4, target_modules=['gate_proj'], layers_to_transform=[0])),
    'gpt2-conv1d': (_gpt2, dict(r=2, lora_alpha=4, target_modules=['c_attn', 'c_proj'])),
    'bert-save-bias': (
        functools.partial(tiny_hf_model, 'bert'),
        dict(r=2, lora_alpha=4, target_modules=['query', 'value'], modules_to_save=['classifier'], bias='all'),
    ),
    'conv': (_ConvNet, dict(r=2, lora_alpha=4, target_modules=['conv', 'seq'], use_dora=True)),
    'llama-exclude': (
        _llama,
        dict(r=2, lora_alpha=4, target_modules=['q_proj', 'v_proj'], exclude_modules=['layers.0.self_attn.v_proj']),
    ),
    # modules_to_save matches by plain suffix: 'classifier' saves pre_classifier too
    'distilbert-save': (
        functools.partial(tiny_hf_model, 'distilbert'),
        dict(r=2, lora_alpha=4, target_modules=['q_lin', 'v_lin'], modules_to_save=['classifier']),
    ),
}


@pytest.mark.parametrize('case', list(CASES))
def test_ours_saved_loads_in_peft_with_equal_outputs(case, tmp_path):
    import peft

    make, lora = CASES[case]
    base = make()
    ours = copy.deepcopy(base)
    apply_lora(ours, **lora)
    randomize_trainable(ours)
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / 'adapter_config.json').read_text())
    assert config['peft_type'] == 'LORA' and config['target_modules'] == sorted(adapter_layers(ours))
    theirs = peft.PeftModel.from_pretrained(base, tmp_path)
    inputs = _inputs(base)
    torch.testing.assert_close(_out(theirs, inputs), _out(ours, inputs), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('case', list(CASES))
def test_peft_saved_loads_in_ours_with_equal_outputs(case, tmp_path):
    import peft

    make, lora = CASES[case]
    base = make()
    peft_kwargs = dict(lora)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**peft_kwargs))
    randomize_peft_adapters(theirs)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if 'modules_to_save' in name or (lora.get('bias') == 'all' and name.endswith('bias')):
                param.add_(0.1)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path)
    inputs = _inputs(base)
    torch.testing.assert_close(_out(ours, inputs), _out(theirs, inputs), atol=1e-5, rtol=1e-4)


def test_loading_an_adapter_for_another_base_shape_fails_before_loading(tmp_path):
    small = _llama(hidden=32)
    apply_lora(small, r=2, target_modules=['q_proj'])
    save_adapter(small, tmp_path)
    other = _llama(hidden=16)
    with pytest.raises(ValueError, match=r'shapes differ .*q_proj.lora_A: adapter \(2, 32\), model \(2, 16\)'):
        load_adapter(other, tmp_path)


def test_pissa_adapter_is_saved_for_the_original_base(tmp_path):
    import peft

    base = _llama()
    ours = copy.deepcopy(base)
    apply_lora(ours, r=2, lora_alpha=4, target_modules=['q_proj', 'v_proj'], init='pissa')
    inputs = _inputs(base)
    torch.testing.assert_close(_out(ours, inputs), _out(base, inputs), atol=1e-5, rtol=1e-4)  # unchanged at step 0
    randomize_trainable(ours)
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / 'adapter_config.json').read_text())['r'] == 4
    theirs = peft.PeftModel.from_pretrained(base, tmp_path)  # the original, unmodified base
    torch.testing.assert_close(_out(theirs, inputs), _out(ours, inputs), atol=1e-5, rtol=1e-4)


def test_sliced_adapters_round_trip_in_our_own_format(tmp_path):
    ours = _gpt2()
    apply_lora(ours, r=2, target_modules=['c_attn'], enable_slices={'c_attn': [True, False, True]})
    randomize_trainable(ours)
    save_adapter(ours, tmp_path)
    assert (tmp_path / 'thaw_lora_config.json').exists() and not (tmp_path / 'adapter_config.json').exists()
    loaded = _gpt2()
    load_adapter(loaded, tmp_path)
    inputs = _inputs(loaded)
    assert torch.equal(_out(loaded, inputs), _out(ours, inputs))


def test_merged_export_is_a_plain_checkpoint_with_the_same_outputs(tmp_path):
    ours = _llama()
    apply_lora(ours, r=2, target_modules=['q_proj', 'embed_tokens'], use_dora=True)
    randomize_trainable(ours)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    export_merged(ours, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any('lora' in n or 'base_layer' in n for n, _ in plain.named_parameters())
    inputs = _inputs(ours)
    torch.testing.assert_close(_out(plain, inputs), _out(ours, inputs), atol=1e-5, rtol=1e-4)
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters())  # still unmerged in memory
    assert not any(layer.merged for layer in adapter_layers(ours).values())
