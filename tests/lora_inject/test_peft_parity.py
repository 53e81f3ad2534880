"""Same base, same config, PEFT's adapter tensors copied into ours: same outputs and gradients as PEFT.

Tolerance: float32, absolute 1e-5 on logits and gradients (relative 1e-4); the two implementations order a few
floating-point operations differently (e.g. DoRA's norm), so bit-equality is not expected.
"""

from __future__ import annotations

import functools

import pytest
import torch

from composer_thaw.models.builtin import minilm_classifier, tiny_decoder

from .helpers import our_grads, peft_grads_in_our_names, twin_models

ATOL, RTOL = 1e-5, 1e-4


@functools.cache
def _base(kind: str):
    torch.manual_seed(0)
    if kind == 'minilm':
        return minilm_classifier(num_labels=3, dropout=0.0).model.eval()
    arch = kind.split('_')[1]
    return tiny_decoder(arch, num_layers=2, hidden_size=32, num_heads=2).model.eval()


def _batch(kind: str):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (2, 12), generator=generator)
    if kind == 'minilm':
        return {'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': torch.tensor([0, 2])}
    return {'input_ids': ids, 'labels': ids}


CASES = {
    'minilm-linear': ('minilm', dict(r=4, lora_alpha=8, target_modules=['query', 'value'])),
    'minilm-embedding': ('minilm', dict(r=4, lora_alpha=8, target_modules=['word_embeddings', 'dense'])),
    'minilm-dora': (
        'minilm',
        dict(r=4, lora_alpha=8, target_modules=['query', 'value', 'word_embeddings'], use_dora=True),
    ),
    'minilm-rslora-patterns': (
        'minilm',
        dict(
            r=4,
            lora_alpha=8,
            target_modules=['query', 'key', 'value'],
            use_rslora=True,
            rank_pattern={'key': 2},
            alpha_pattern={'value': 3},
        ),
    ),
    'minilm-modules-to-save-bias': (
        'minilm',
        dict(r=2, lora_alpha=4, target_modules=['query'], modules_to_save=['classifier'], bias='all'),
    ),
    'llama-linear': ('decoder_llama', dict(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj', 'down_proj'])),
    'llama-embedding-dora': (
        'decoder_llama',
        dict(r=4, lora_alpha=8, target_modules=['embed_tokens', 'o_proj'], use_dora=True),
    ),
    'llama-layers': (
        'decoder_llama',
        dict(r=2, lora_alpha=2, target_modules=['q_proj', 'up_proj'], layers_to_transform=[1]),
    ),
    'gpt2-conv1d': ('decoder_gpt2', dict(r=4, lora_alpha=8, target_modules=['c_attn', 'c_fc'])),
    'gpt2-conv1d-dora': (
        'decoder_gpt2',
        dict(r=4, lora_alpha=8, target_modules=['c_attn', 'c_proj', 'wte'], use_dora=True),
    ),
}


@pytest.mark.parametrize('case', list(CASES))
def test_forward_and_gradients_equal_peft(case):
    kind, lora = CASES[case]
    ours, theirs = twin_models(_base(kind), **lora)
    batch = _batch(kind)
    our_out, peft_out = ours(**batch), theirs(**batch)
    torch.testing.assert_close(our_out.logits, peft_out.logits, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(our_out.logits, _base(kind)(**batch).logits, atol=1e-3)  # the adapters matter
    our_out.loss.backward()
    peft_out.loss.backward()
    expected = peft_grads_in_our_names(ours, theirs)
    actual = our_grads(ours)
    assert set(actual) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, atol=ATOL, rtol=RTOL, msg=lambda m, name=name: f'{name}: {m}')
