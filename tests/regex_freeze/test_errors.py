"""Each bad input gives its own clear error, before anything about the model or optimizer has changed."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from composer_thaw.core.registry import build_algorithm
from composer_thaw.core.validation import ConfigError
from composer_thaw.regex_freeze import RegexFreeze, apply_regex_freeze, freeze_preview


def _snapshot(model, optimizer):
    return ([p.requires_grad for p in model.parameters()], [len(g['params']) for g in optimizer.param_groups])


@pytest.fixture
def fresh():
    import support

    model = support.seeded_tiny_decoder(num_layers=2)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def _raises_unchanged(fresh, match, **kwargs):
    model, optimizer = fresh
    before = _snapshot(model, optimizer)
    with pytest.raises(ValueError, match=match):
        apply_regex_freeze(model, optimizer, **kwargs)
    assert _snapshot(model, optimizer) == before, 'nothing may change when an error is raised'


def test_pattern_matching_nothing_names_it_and_lists_closest_names(fresh):
    model, optimizer = fresh
    with pytest.raises(ValueError) as error:
        apply_regex_freeze(model, optimizer, trainable=['lm_head', 'lm_haed'])
    message = str(error.value)
    assert "trainable pattern 'lm_haed'" in message
    assert "Closest parameter names: 'lm_head.weight'" in message
    assert "pattern 'lm_head'" not in message  # only the bad pattern is reported
    assert all(p.requires_grad for p in model.parameters())


def test_pattern_anchored_at_start_that_matches_nothing_is_an_error(fresh):
    # 'layers.0' would match with re.search, but axolotl's syntax matches from the start of the name.
    _raises_unchanged(
        fresh, r"trainable pattern 'layers\.0' .*re\.match.* matches no parameter", trainable=['layers.0']
    )


def test_frozen_pattern_matching_nothing_is_an_error(fresh):
    _raises_unchanged(fresh, r"frozen pattern 'model\.layers\.9' .*matches no parameter", frozen=['model.layers.9'])


def test_every_unmatched_pattern_is_reported(fresh):
    _raises_unchanged(fresh, r"(?s)'nope_a'.*'nope_b'", trainable=['lm_head', 'nope_a'], frozen=['nope_b'])


def test_row_range_beyond_the_last_row(fresh):
    _raises_unchanged(
        fresh,
        re.escape("selects rows [30000:40000] of 'model.embed_tokens.weight', which has 30522 rows"),
        trainable=['model.embed_tokens.weight[30000:40000]'],
    )


def test_row_index_beyond_the_last_row(fresh):
    _raises_unchanged(fresh, re.escape('selects rows [64:65]'), trainable=['model.layers.0.mlp.up_proj.weight[64]'])


def test_open_range_starting_at_the_row_count_is_empty(fresh):
    _raises_unchanged(fresh, re.escape('0 <= start < end <= 30522'), trainable=['lm_head.weight[30522:]'])


def test_out_of_range_in_frozen_list(fresh):
    _raises_unchanged(fresh, r'frozen pattern .* selects rows \[0:99\]', frozen=['model.norm.weight[0:99]'])


@pytest.mark.parametrize('pattern', ['lm_head.weight[5:5]', 'lm_head.weight[9:3]'])
def test_empty_row_range(pattern):
    with pytest.raises(ValueError, match=r'empty row range .* the end must be greater than the start'):
        RegexFreeze(trainable=[pattern])


@pytest.mark.parametrize(
    'pattern',
    [
        'lm_head.weight[1:2:3]',
        'lm_head.weight[-1]',
        'lm_head.weight[-5:]',
        'lm_head.weight[ 1:2]',
        'lm_head.weight[a:b]',
        'lm_head.weight[]',
        '[0:10]',
    ],
)
def test_malformed_row_range(pattern):
    with pytest.raises(ValueError, match=r'malformed row range'):
        RegexFreeze(trainable=[pattern])


def test_character_class_at_the_end_is_a_regex_not_a_range():
    algorithm = RegexFreeze(trainable=['model.layers.[0-2]'])  # no error: '[0-2]' is a character class
    assert algorithm.trainable == ['model.layers.[0-2]']


def test_range_on_a_0d_tensor():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.tensor(1.0))

    model = Scaled()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r"matches 'scale', a 0-d \(scalar\) tensor that has no rows"):
        apply_regex_freeze(model, optimizer, trainable=['linear', 'scale[0:1]'])
    assert all(p.requires_grad for p in model.parameters())
    # Without a range a 0-d tensor is selected normally.
    apply_regex_freeze(model, optimizer, trainable=['scale'])
    assert model.scale.requires_grad and not model.linear.weight.requires_grad


def test_invalid_regex():
    with pytest.raises(ValueError, match=r"trainable pattern 'model\.layers\.\(1' is not a valid regular expression"):
        RegexFreeze(trainable=['model.layers.(1'])


def test_bad_argument_types_and_values():
    # wrong types and choices: checked against the annotations first, as in a recipe
    with pytest.raises(
        TypeError, match=r"^algorithms\.regex_freeze\.trainable = 'lm_head': expected a list of a string"
    ):
        RegexFreeze(trainable='lm_head')
    with pytest.raises(TypeError, match=r"trainable = \['lm_head', 3\]: expected a list of a string"):
        RegexFreeze(trainable=['lm_head', 3])
    with pytest.raises(ValueError, match=r"syntax = 'glob': expected one of 'axolotl', 'regex'"):
        RegexFreeze(trainable=['lm_head'], syntax='glob')
    with pytest.raises(ValueError, match='needs patterns'):
        RegexFreeze()
    with pytest.raises(ValueError, match='empty pattern'):
        RegexFreeze(trainable=[''])


def test_recipe_errors_name_the_key():
    with pytest.raises(
        ConfigError, match=r"algorithms\.regex_freeze\.trainable = 'lm_head': expected a list of a string"
    ):
        build_algorithm('regex_freeze', {'trainable': 'lm_head'})
    with pytest.raises(ConfigError, match=r'malformed row range'):
        build_algorithm('regex_freeze', {'trainable': ['lm_head.weight[1:2:3]']})


def test_row_ranges_without_an_optimizer(fresh):
    model, _ = fresh
    with pytest.raises(ValueError, match='Row ranges need the optimizer'):
        apply_regex_freeze(model, None, trainable=['lm_head.weight[0:10]'])
    assert all(p.requires_grad for p in model.parameters())


def test_trainable_tensor_missing_from_the_optimizer(fresh):
    model, _ = fresh
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if 'lm_head' not in n])
    with pytest.raises(ValueError, match=r'selected as trainable but are not in the optimizer.*lm_head\.weight'):
        apply_regex_freeze(model, optimizer, trainable=['lm_head', 'model.norm'])


def test_nothing_left_trainable_warns(fresh):
    model, optimizer = fresh
    with pytest.warns(UserWarning, match='left nothing trainable'):
        selection = apply_regex_freeze(model, optimizer, trainable=['lm_head'], frozen=['lm_head'])
    assert selection.trainable_params == 0
    assert not any(p.requires_grad for p in model.parameters())
    assert all(not group['params'] for group in optimizer.param_groups)


def test_preview_raises_the_same_errors(fresh):
    model, _ = fresh
    with pytest.raises(ValueError, match="trainable pattern 'lm_haed'"):
        freeze_preview(model, trainable=['lm_haed'])
