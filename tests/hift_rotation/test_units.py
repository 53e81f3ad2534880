"""Units and groups match the ``hift`` package's grouping (embeddings, each block, then each special layer, in its
order), found without per-model code; ``freeze`` indices, ``always_trainable`` and explicit ``groups`` select units."""

from __future__ import annotations

import pytest
import torch
from support import seeded_tiny_decoder

from composer_thaw.hift_rotation import plan_rotation, rotation_preview, rotation_units
from composer_thaw.utils.parameter_selection import user_module

from .hift_reference import hift_handler, hift_unit_parameters


@pytest.fixture(scope='module')
def minilm():
    from composer_thaw.models.builtin import minilm_classifier

    return user_module(minilm_classifier(num_labels=6))


def test_minilm_units_are_hifts_bert_units_with_the_same_parameters(minilm):
    ours = rotation_units(minilm)
    theirs = hift_unit_parameters(hift_handler('bert', 'SEQ_CLS'), minilm)
    assert [u.name for u in ours] == ['bert.embeddings'] + [f'bert.encoder.layer.{i}' for i in range(6)] + [
        'bert.pooler',
        'classifier',
    ]
    assert [list(u.parameter_names) for u in ours] == theirs


def test_llama_units_are_hifts_llama_units_with_the_same_parameters():
    root = user_module(seeded_tiny_decoder())
    ours = rotation_units(root)
    theirs = hift_unit_parameters(hift_handler('llama', 'CAUSAL_LM'), root)
    assert [u.name for u in ours] == [
        'model.embed_tokens',
        'model.layers.0',
        'model.layers.1',
        'model.layers.2',
        'model.layers.3',
        'model.norm',
        'lm_head',
    ]
    assert [list(u.parameter_names) for u in ours] == theirs


def test_gpt2_with_tied_head_matches_hifts_gpt2_units():
    root = user_module(seeded_tiny_decoder(arch='gpt2', tie_word_embeddings=True))
    ours = rotation_units(root)
    theirs = hift_unit_parameters(hift_handler('gpt2', 'CAUSAL_LM'), root)
    assert [list(u.parameter_names) for u in ours] == theirs  # wte + wpe form unit 0; lm_head is wte's alias
    assert ours[-1].name == 'transformer.ln_f'


@pytest.mark.parametrize('freeze', [[0], [0, 3, 8], [8]])
def test_freeze_indices_drop_the_same_units_as_hifts_freeze_layers(minilm, freeze):
    plan = plan_rotation(minilm, freeze=freeze)
    theirs = hift_unit_parameters(hift_handler('bert', 'SEQ_CLS', freeze_layers=freeze), minilm)
    assert [list(plan.units[i].parameter_names) for i in plan.rotating] == theirs
    assert plan.frozen == tuple(freeze)


def test_always_trainable_units_leave_the_rotation():
    plan = plan_rotation(user_module(seeded_tiny_decoder()), always_trainable=['embed', '^lm_head$'])
    assert plan.always == (0, 6)
    assert plan.names(plan.rotating) == [
        'model.layers.0',
        'model.layers.1',
        'model.layers.2',
        'model.layers.3',
        'model.norm',
    ]


def test_explicit_group_regexes_replace_the_automatic_units_first_match_wins():
    plan = plan_rotation(user_module(seeded_tiny_decoder()), groups=[r'layers\.[01]\.', r'layers\.', '.*'])
    assert [u.name for u in plan.units] == [r'layers\.[01]\.', r'layers\.', '.*']
    assert all('layers.0.' in n or 'layers.1.' in n for n in plan.units[0].parameter_names)
    assert all('layers.2.' in n or 'layers.3.' in n for n in plan.units[1].parameter_names)
    assert set(plan.units[2].parameter_names) == {'model.embed_tokens.weight', 'model.norm.weight', 'lm_head.weight'}


def test_only_parameters_that_train_at_the_start_are_rotated():
    root = user_module(seeded_tiny_decoder())
    root.model.norm.weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for n, p in root.named_parameters() if not n.startswith('lm_head')])
    assert [u.name for u in rotation_units(root, optimizer)] == [
        'model.embed_tokens',
        'model.layers.0',
        'model.layers.1',
        'model.layers.2',
        'model.layers.3',
    ]


def test_the_dry_run_table_lists_units_shares_and_the_groups_of_each_pass():
    table = rotation_preview(seeded_tiny_decoder(), group_size=2, passes=2)
    assert '0  model.embed_tokens' in table and '6  lm_head' in table
    assert 'group 1: model.embed_tokens, model.layers.0' in table
    assert 'group 1: lm_head, model.embed_tokens' in table  # 7 units in groups of 2: the second pass is shifted
    assert 'largest trainable share' in table
