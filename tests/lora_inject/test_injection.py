"""Which modules get adapters, what trains, and the errors: all decided before the model is touched."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from composer_thaw.lora_inject import LoRAInject, LoRALinear, apply_lora
from composer_thaw.lora_inject.injection import adapter_layers
from composer_thaw.models.builtin import tiny_decoder

from .helpers import tiny_hf_model


def _llama(num_layers=4):
    torch.manual_seed(0)
    return tiny_decoder('llama', num_layers=num_layers, hidden_size=32, num_heads=2).model


def _gpt2():
    torch.manual_seed(0)
    return tiny_decoder('gpt2', num_layers=2, hidden_size=32, num_heads=2).model


def _bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    return BertForSequenceClassification(config)


def _adapted(model):
    return sorted(adapter_layers(model))


def test_list_targets_match_whole_names_or_name_suffixes():
    model = _llama(2)
    apply_lora(model, r=2, target_modules=['q_proj', 'layers.1.mlp.up_proj'])
    assert _adapted(model) == [
        'model.layers.0.self_attn.q_proj',
        'model.layers.1.mlp.up_proj',
        'model.layers.1.self_attn.q_proj',
    ]


def test_regex_target_must_match_the_whole_name():
    model = _llama(2)
    apply_lora(model, r=2, target_modules=r'model\.layers\.0\.self_attn\.(k|v)_proj')
    assert _adapted(model) == ['model.layers.0.self_attn.k_proj', 'model.layers.0.self_attn.v_proj']


def test_all_linear_leaves_out_the_lm_head():
    model = _llama(2)
    apply_lora(model, r=2, target_modules='all-linear')
    names = _adapted(model)
    assert len(names) == 2 * 7 and 'lm_head' not in names


def test_all_linear_adapts_a_classifier_head_unless_saved_and_includes_conv1d():
    # PEFT without task_type leaves out only the LM head; a head in modules_to_save is never adapted
    bert = _bert()
    apply_lora(bert, r=2, target_modules='all-linear')
    assert 'classifier' in _adapted(bert) and 'bert.pooler.dense' in _adapted(bert)
    saved = _bert()
    apply_lora(saved, r=2, target_modules='all-linear', modules_to_save=['classifier'])
    assert 'classifier' not in _adapted(saved) and isinstance(saved.classifier, nn.Linear)
    gpt2 = _gpt2()
    apply_lora(gpt2, r=2, target_modules='all-linear')
    assert 'transformer.h.0.attn.c_attn' in _adapted(gpt2) and 'lm_head' not in _adapted(gpt2)


@pytest.mark.parametrize(
    'make, expected',
    [
        (_llama, {'q_proj', 'v_proj'}),
        (_gpt2, {'c_attn'}),
        (_bert, {'query', 'value'}),
    ],
)
def test_default_targets_follow_the_model_type(make, expected):
    model = make()
    apply_lora(model, r=2)
    assert {name.rsplit('.', 1)[-1] for name in _adapted(model)} == expected


def test_layers_to_transform_selects_blocks():
    model = _llama(4)
    apply_lora(model, r=2, target_modules=['q_proj'], layers_to_transform=[1, 3])
    assert _adapted(model) == ['model.layers.1.self_attn.q_proj', 'model.layers.3.self_attn.q_proj']


def test_rank_and_alpha_patterns_override_per_target():
    model = _llama(2)
    apply_lora(
        model,
        r=2,
        lora_alpha=4,
        target_modules=['q_proj', 'v_proj'],
        rank_pattern={'v_proj': 6},
        alpha_pattern={r'layers\.1\.self_attn\.q_proj': 1},
    )
    layers = adapter_layers(model)
    assert layers['model.layers.0.self_attn.v_proj'].r == 6
    assert layers['model.layers.0.self_attn.v_proj'].lora_A.shape == (6, 32)
    assert layers['model.layers.0.self_attn.q_proj'].scaling == 2.0
    assert layers['model.layers.1.self_attn.q_proj'].scaling == 0.5


def test_only_adapters_modules_to_save_and_chosen_biases_train():
    bert = _bert()
    apply_lora(bert, r=2, target_modules=['query'], modules_to_save=['classifier'], bias='lora_only')
    trainable = {n for n, p in bert.named_parameters() if p.requires_grad}
    query = 'bert.encoder.layer.{}.attention.self.query'
    assert trainable == {
        *(f'{query.format(i)}.{leaf}' for i in (0, 1) for leaf in ('lora_A', 'lora_B', 'base_layer.bias')),
        'classifier.weight',
        'classifier.bias',
    }
    assert isinstance(bert.classifier, nn.Linear)  # trained in full, not adapted


def test_bias_all_trains_every_bias():
    bert = _bert()
    apply_lora(bert, r=2, target_modules=['query'], bias='all')
    biases = {n for n, _ in bert.named_parameters() if n.endswith('.bias')}
    trainable = {n for n, p in bert.named_parameters() if p.requires_grad}
    assert biases <= trainable and not any(n.endswith('.weight') for n in trainable)


@pytest.mark.parametrize(
    'kwargs, message',
    [
        ({'target_modules': ['q_porj']}, r"'q_porj' matches no module .* Did you mean .*'q_proj'"),
        (
            {'target_modules': ['self_attn']},
            r'LlamaAttention, which LoRAInject cannot adapt. Supported types: nn.Linear',
        ),
        ({'target_modules': ['norm']}, r'LlamaRMSNorm.*Supported types'),
        ({'target_modules': r'.*\.q_projection'}, r'matches no module'),
        ({'target_modules': ['q_proj'], 'layers_to_transform': [9]}, r'layers_to_transform=\[9\].*leaves no target'),
        ({'target_modules': ['q_proj'], 'modules_to_save': ['clasifier']}, r"modules_to_save entry 'clasifier'"),
        ({'r': 0}, r'r=0 is invalid: the rank must be a positive integer'),
        ({'r': 4, 'lora_alpha': -1}, r'lora_alpha=-1 is invalid'),
        ({'lora_dropout': 1.0}, r'lora_dropout=1.0 is invalid: it must be a number in \[0, 1\)'),
        ({'rank_pattern': {'q_proj': 0}}, r"rank_pattern\['q_proj'\]=0 is invalid"),
        ({'init': 'pissa', 'target_modules': ['embed_tokens']}, r"init='pissa' supports linear layers only"),
    ],
)
def test_errors_name_the_problem_and_leave_model_and_optimizer_untouched(kwargs, message):
    model = _llama(2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [(n, type(m)) for n, m in model.named_modules()]
    groups_before = [list(g['params']) for g in optimizer.param_groups]
    with pytest.raises(ValueError, match=message):
        apply_lora(model, optimizer, **kwargs)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert [list(g['params']) for g in optimizer.param_groups] == groups_before


def test_a_late_error_in_the_target_list_leaves_earlier_targets_alone():
    model = _llama(2)
    with pytest.raises(ValueError, match='matches no module'):
        apply_lora(model, target_modules=['q_proj', 'v_proj', 'nothing_like_this'])
    assert not adapter_layers(model)


def test_no_default_for_an_unknown_model_type_is_a_clear_error():
    with pytest.raises(ValueError, match=r'no default for model_type=None \(Sequential\)'):
        apply_lora(nn.Sequential(nn.Linear(2, 2)))


def test_algorithm_arguments_are_validated_on_construction():
    with pytest.raises(ValueError, match=r'r=-2 is invalid'):
        LoRAInject(r=-2)
    with pytest.raises(ValueError, match=r'save_merged_to = 3: expected a string or null'):
        LoRAInject(save_merged_to=3)
    with pytest.raises(ValueError, match=r"save_merged_to='' is invalid"):
        LoRAInject(save_merged_to='')


def test_a_peft_model_is_refused():
    import peft

    model = peft.get_peft_model(_llama(2), peft.LoraConfig(r=2, target_modules=['q_proj']))
    with pytest.raises(ValueError, match='already a PEFT model'):
        apply_lora(model, target_modules=['v_proj'])


def test_a_huggingface_model_with_peft_config_is_refused():
    import peft
    from composer.models import HuggingFaceModel

    composer_model = HuggingFaceModel(_llama(2), peft_config=peft.LoraConfig(r=2, target_modules=['q_proj']))
    with pytest.raises(ValueError, match='already a PEFT model'):
        apply_lora(composer_model, target_modules=['v_proj'])


def test_applying_twice_is_applying_once():
    model = _llama(2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    apply_lora(model, optimizer, r=2, target_modules=['q_proj'])
    layers = adapter_layers(model)
    params = [list(g['params']) for g in optimizer.param_groups]
    apply_lora(model, optimizer, r=2, target_modules=['q_proj'])
    assert adapter_layers(model) == layers
    assert [list(g['params']) for g in optimizer.param_groups] == params
    assert not any(isinstance(m.base_layer, LoRALinear) for m in layers.values())
    with pytest.raises(ValueError, match='already has LoRA adapters with another configuration'):
        apply_lora(model, optimizer, r=4, target_modules=['q_proj'])


def test_gradient_checkpointing_still_trains_the_adapters():
    model = _llama(2)
    model.gradient_checkpointing_enable()
    model.train()
    apply_lora(model, r=2, target_modules=['q_proj'])
    ids = torch.randint(0, 1000, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [layer.lora_B.grad for layer in adapter_layers(model).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_the_algorithm_repr_evals_back_and_is_equal():
    algorithm = LoRAInject(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'], rank_pattern={'v_proj': 2})
    assert eval(repr(algorithm)) == algorithm
    assert LoRAInject.required_on_load()


@pytest.mark.parametrize(
    'model, message',
    [
        (nn.Flatten(), r'Flatten has no parameters, so LoRA has nothing to adapt'),
        (
            nn.Sequential(nn.LayerNorm(4), nn.GELU()),
            r'no module of a type LoRA can adapt: its parameters belong to LayerNorm',
        ),
    ],
)
def test_a_model_without_adaptable_layers_is_named_as_such(model, message):
    with pytest.raises(ValueError, match=message) as error:
        apply_lora(model, r=2, target_modules=['q_proj'])
    assert '[]' not in str(error.value)


def test_a_task_head_left_frozen_is_warned_about_and_a_saved_one_is_not():
    with pytest.warns(UserWarning, match="head 'classifier' of BertForSequenceClassification stays frozen"):
        apply_lora(tiny_hf_model('bert'), r=2, target_modules=['query', 'value'])
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        apply_lora(tiny_hf_model('bert'), r=2, target_modules=['query', 'value'], modules_to_save=['classifier'])
        apply_lora(
            tiny_decoder('llama', num_layers=2).model, r=2, target_modules=['q_proj']
        )  # a language model has no task head
