"""Module selection means what it means in PEFT: the same configuration adapts and saves the same modules here and
in ``peft.get_peft_model``, on several architectures, and the adapter we save loads in PEFT with equal outputs."""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
from torch import nn

from composer_thaw.lora_inject import DEFAULT_TARGET_MODULES, LoRAConfig, apply_lora, lora_config_of, save_adapter
from composer_thaw.lora_inject.injection import adapter_layers, default_target_modules, saved_module_names
from composer_thaw.lora_inject.matching import block_index, is_target
from composer_thaw.lora_inject.peft_format import config_from_peft
from composer_thaw.models.builtin import tiny_decoder

from .helpers import randomize_trainable, tiny_hf_model


@functools.cache
def _base(kind: str) -> nn.Module:
    if kind in ('llama', 'gpt2'):
        torch.manual_seed(0)
        return tiny_decoder(kind, num_layers=2, hidden_size=32, num_heads=2).model.eval()
    return tiny_hf_model(kind)


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    inputs = {'input_ids': ids}
    if model.config.is_encoder_decoder:
        inputs['decoder_input_ids'] = ids[:, :6]
    return inputs


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _peft_selection(peft_model: nn.Module) -> tuple[list[str], list[str]]:
    """(adapted, saved) module names in PEFT's model, relative to the user's model."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    inner = peft_model.base_model.model
    adapted = sorted(name for name, module in inner.named_modules() if isinstance(module, LoraLayer))
    saved = sorted(name for name, module in inner.named_modules() if isinstance(module, ModulesToSaveWrapper))
    return adapted, saved


# Model types PEFT's mapping gained after 0.16 (the pinned stack's PEFT): ours has them with either PEFT.
ADDED_AFTER_PEFT_0_16 = {'gemma4', 'nemotron_h', 'rwkv', 'rwkv7'}


def test_default_targets_equal_peft_mapping_entry_by_entry():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_mapping

    assert set(peft_mapping) <= set(DEFAULT_TARGET_MODULES), sorted(set(peft_mapping) - set(DEFAULT_TARGET_MODULES))
    assert set(DEFAULT_TARGET_MODULES) - set(peft_mapping) <= ADDED_AFTER_PEFT_0_16
    for model_type, targets in peft_mapping.items():
        ours = DEFAULT_TARGET_MODULES[model_type]
        assert (ours if isinstance(ours, str) else list(ours)) == (
            targets if isinstance(targets, str) else list(targets)
        ), model_type


def test_a_regex_default_stands_for_the_model_type_as_a_target_modules_string():
    model = _base('llama')
    model.config.model_type = 'gemma4'  # PEFT's default there: the language model's q_proj and v_proj, as a regex
    try:
        assert default_target_modules(model) == DEFAULT_TARGET_MODULES['gemma4']
        assert is_target('model.language_model.layers.0.self_attn.q_proj', target_modules=default_target_modules(model))
        assert not is_target(
            'model.vision_tower.layers.0.self_attn.q_proj', target_modules=default_target_modules(model)
        )
    finally:
        model.config.model_type = 'llama'


NAMES = (
    'q_proj',
    'xq_proj',
    'model.layers.0.self_attn.q_proj',
    'model.layers.1.self_attn.q_proj',
    'model.layers.1.self_attn.k_proj',
    'model.layers.0.mlp.up_proj',
    'model.layers.1.mlp.up_proj',
    'model.layers.10.mlp.experts.2.up_proj',
    'transformer.h.2.experts.0.up_proj',
    'transformer.h.0.attn.c_attn',
    'encoder.block.1.layer.0.SelfAttention.q',
    'lm_head',
    'pre_classifier',
    'classifier',
    'classifier.dense',
    'roberta.classifier.out_proj',
)

RULES = (
    dict(target_modules=['q_proj', 'c_attn', 'q']),
    dict(target_modules=['q_proj', 'model.layers.0.mlp.up_proj', 'up_proj'], layers_to_transform=[1]),
    dict(target_modules=['up_proj', 'q', 'c_attn'], layers_to_transform=2),
    dict(target_modules=['up_proj', 'q_proj'], layers_to_transform=1, layers_pattern='layers'),
    dict(target_modules=['up_proj', 'c_attn'], layers_to_transform=[0, 2], layers_pattern=['h', 'experts']),
    dict(target_modules=['up_proj', 'c_attn'], layers_to_transform=[0, 2], layers_pattern=['experts', 'h']),
    dict(target_modules=r'.*\.(q|k)_proj'),
    dict(target_modules=['q_proj', 'up_proj'], exclude_modules=['layers.1.self_attn.q_proj', 'experts.2.up_proj']),
    dict(target_modules=r'.*', exclude_modules=r'.*\.mlp\..*', modules_to_save=['lm_head']),
    dict(target_modules=['dense', 'out_proj', 'classifier', 'pre_classifier', 'q'], modules_to_save=['classifier']),
)


def _peft_reads_the_first_index() -> bool:
    """PEFT 0.21 reads a name's first block index for layers_to_transform (the block's); 0.16 read the last (in an
    MoE model, the expert's)."""
    import peft
    from peft.tuners.tuners_utils import check_target_module_exists

    config = peft.LoraConfig(target_modules=['up_proj'], layers_to_transform=[10])
    return bool(check_target_module_exists(config, 'model.layers.10.mlp.experts.2.up_proj'))


@pytest.mark.parametrize('rule', RULES, ids=[str(i) for i in range(len(RULES))])
def test_the_target_rule_is_peft_check_target_module_exists(rule):
    import peft
    from peft.tuners.tuners_utils import check_target_module_exists

    names = NAMES
    if not _peft_reads_the_first_index():  # names with one index mean the same in every PEFT
        names = tuple(name for name in NAMES if len(re.findall(r'\.\d+\.', name)) < 2)
    config = peft.LoraConfig(**rule)
    ours = {name for name in names if is_target(name, **rule)}
    theirs = {name for name in names if check_target_module_exists(config, name)}
    assert ours == theirs


def test_block_index_reads_the_first_container_index_the_block_not_an_expert():
    assert block_index('model.layers.10.mlp.experts.2.up_proj') == 10
    assert block_index('model.layers.10.mlp.experts.2.up_proj', 'layers') == 10
    assert block_index('model.layers.10.mlp.experts.2.up_proj', 'experts') == 2
    assert block_index('transformer.h.2.experts.0.up_proj', ['experts', 'h']) == 0  # the first pattern that matches
    assert block_index('transformer.h.2.experts.0.up_proj', '(h|experts)') == 2  # a group in the pattern is fine
    assert block_index('layers.0.q_proj') is None  # without a pattern, PEFT needs a dot before the container
    assert block_index('layers.0.q_proj', 'layers') == 0  # a pattern may start the name


CASES = {
    'llama-default': ('llama', {}),
    'llama-all-linear-exclude': (
        'llama',
        dict(target_modules='all-linear', exclude_modules=['o_proj', 'model.layers.1.mlp.up_proj']),
    ),
    'llama-layers-full-name': (
        'llama',
        dict(target_modules=['q_proj', 'model.layers.0.mlp.up_proj'], layers_to_transform=[1]),
    ),
    'llama-layers-pattern-exclude-regex': (
        'llama',
        dict(
            target_modules=['q_proj', 'k_proj', 'down_proj'],
            layers_to_transform=1,
            layers_pattern='layers',
            exclude_modules=r'.*\.k_proj',
        ),
    ),
    'gpt2-default': ('gpt2', {}),
    'gpt2-all-linear': ('gpt2', dict(target_modules='all-linear', modules_to_save=['ln_f'])),
    'bert-all-linear-classifier': ('bert', dict(target_modules='all-linear', modules_to_save=['classifier'])),
    'bert-default-exclude': ('bert', dict(exclude_modules=r'.*\.layer\.0\..*', modules_to_save=['classifier'])),
    'distilbert-classifier': ('distilbert', dict(target_modules=['q_lin', 'v_lin'], modules_to_save=['classifier'])),
    'distilbert-all-linear': (
        'distilbert',
        dict(target_modules='all-linear', modules_to_save=['classifier'], exclude_modules=['pre_classifier']),
    ),
    'roberta-all-linear': ('roberta', dict(target_modules='all-linear')),
    'roberta-all-linear-classifier': ('roberta', dict(target_modules='all-linear', modules_to_save=['classifier'])),
    't5-default': ('t5', {}),
    't5-regex': ('t5', dict(target_modules=r'decoder\..*\.(k|o)')),
    'bart-all-linear-exclude-encoder': (
        'bart',
        dict(target_modules='all-linear', exclude_modules=r'model\.encoder\..*'),
    ),
    'bart-layers-pattern-list': (
        'bart',
        dict(target_modules=['q_proj', 'fc1'], layers_to_transform=[1], layers_pattern=['layers']),
    ),
}


@pytest.mark.parametrize('case', list(CASES))
def test_selection_equals_peft_and_the_saved_adapter_loads_in_peft(case, tmp_path):
    import peft

    kind, selection = CASES[case]
    base = _base(kind)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, **selection))
    ours = copy.deepcopy(base)
    summary = apply_lora(ours, r=2, lora_alpha=4, **selection)
    adapted, saved = _peft_selection(theirs)
    assert sorted(adapter_layers(ours)) == adapted
    assert sorted(saved_module_names(ours, lora_config_of(ours))) == saved
    assert summary.trainable_params == theirs.get_nb_trainable_parameters()[0]

    randomize_trainable(ours)
    save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert _peft_selection(loaded) == (adapted, saved)
    inputs = _inputs(base)
    torch.testing.assert_close(_logits(loaded, inputs), _logits(ours, inputs), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(_logits(base, inputs), _logits(ours, inputs), atol=1e-3)  # the trained parts matter


def test_modules_to_save_is_a_plain_suffix_so_classifier_also_saves_pre_classifier():
    model = copy.deepcopy(_base('distilbert'))
    apply_lora(model, r=2, target_modules=['q_lin'], modules_to_save=['classifier'])
    trainable = {name for name, param in model.named_parameters() if param.requires_grad and 'lora_' not in name}
    assert trainable == {'pre_classifier.weight', 'pre_classifier.bias', 'classifier.weight', 'classifier.bias'}


def test_a_module_both_adapted_and_saved_is_refused_as_in_peft():
    import peft

    selection = dict(target_modules='all-linear', modules_to_save=['classifier'])  # pre_classifier: both
    with pytest.raises(TypeError, match=r'modules_to_save cannot be applied to modules of type .*lora'):
        peft.get_peft_model(copy.deepcopy(_base('distilbert')), peft.LoraConfig(r=2, **selection))
    model = copy.deepcopy(_base('distilbert'))
    with pytest.raises(
        ValueError, match=r"'pre_classifier' would be both adapted and trained in full.*exclude_modules"
    ):
        apply_lora(model, r=2, **selection)
    assert not adapter_layers(model)


def test_targets_that_are_all_excluded_are_an_error_as_in_peft():
    import peft

    selection = dict(target_modules=['q_proj'], exclude_modules=r'.*\.q_proj')
    with pytest.raises(ValueError, match='No modules were targeted'):
        peft.get_peft_model(copy.deepcopy(_base('llama')), peft.LoraConfig(r=2, **selection))
    with pytest.raises(ValueError, match=r'leave none of them to adapt'):
        apply_lora(copy.deepcopy(_base('llama')), r=2, **selection)


@pytest.mark.parametrize('target_modules', ['all-linear', r'.*\.q_proj'])
def test_block_indices_with_a_string_target_are_refused_as_in_peft(target_modules):
    import peft

    with pytest.raises(ValueError, match='layers_to_transform'):
        peft.LoraConfig(target_modules=target_modules, layers_to_transform=[0])
    with pytest.raises(ValueError, match=r'layers_to_transform=\[0\] cannot be combined with target_modules'):
        LoRAConfig(target_modules=target_modules, layers_to_transform=[0])


def test_exclude_modules_that_exclude_nothing_warn():
    with pytest.warns(UserWarning, match=r"exclude_modules=\['nothing_here'\] excludes no module"):
        apply_lora(copy.deepcopy(_base('llama')), r=2, target_modules=['q_proj'], exclude_modules=['nothing_here'])


class _TwoFc(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 4)
        self.block = nn.Sequential()
        self.block.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.block(self.fc(x))


def test_an_adapted_set_the_name_list_cannot_express_is_saved_as_a_regex(tmp_path):
    import json

    import peft

    ours = _TwoFc()
    apply_lora(ours, r=2, target_modules='fc')  # the top-level fc only; ['fc'] would also pick block.fc
    randomize_trainable(ours)
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / 'adapter_config.json').read_text())['target_modules'] == '(?:fc)'
    loaded = peft.PeftModel.from_pretrained(_TwoFc(), tmp_path)
    assert _peft_selection(loaded)[0] == ['fc']
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours(x))


def test_a_peft_config_loads_with_target_entries_that_match_nothing():
    llama = _base('llama')
    config = config_from_peft({'target_modules': ['q_proj', 'query', 'c_attn'], 'modules_to_save': ['score']}, llama)
    assert config.target_modules == ['q_proj'] and config.modules_to_save is None
