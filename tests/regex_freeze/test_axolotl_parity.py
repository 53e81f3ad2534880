"""The default syntax selects exactly what axolotl's ``unfrozen_parameters`` code selects."""

from __future__ import annotations

import pytest

from composer_thaw.regex_freeze import select_parameters
from composer_thaw.regex_freeze.patterns import parse_patterns
from composer_thaw.utils.parameter_selection import user_module

from .axolotl_oracle import axolotl_matches, axolotl_row_masks
from .conftest import shapes_of

DECODER_CASES = [
    ['lm_head'],
    ['model.layers.3'],
    ['model.embed_tokens.weight[0:100]'],
    ['model.embed_tokens.weight[:10]', 'model.embed_tokens.weight[5:20]'],  # overlapping ranges merge
    ['lm_head.weight[0:1]', 'lm_head.weight[1:2]', 'lm_head.weight[4:6]'],  # touching and separate ranges
    ['model.embed_tokens.weight[30000:]'],
    ['lm_head.weight[7]'],
    ['model.embed_tokens.weight[:]'],
    ['model.layers.[0-2].self_attn'],
    ['^model.norm.weight$'],
    ['model.layers.2.mlp.gate_proj.weight$[3:9]'],  # '$' before the range
    ['model.layers.1', 'model.layers.1.mlp.up_proj.weight[0:4]'],  # a range wins over a whole-tensor pattern
    ['model.layers.(1|3).mlp'],
    [r'model.layers.\d.input_layernorm'],
    ['.+norm'],  # '.+' stays a wildcard (axolotl escapes only dots not followed by '+')
    ['model.layers.3.self_attn.[qk]_proj'],
    ['model.embed_tokens.weight[100:200]', 'lm_head.weight[100:200]', 'model.layers.0'],
    ['model.layers.0.mlp.down_proj.weight[31]'],  # the last row
    ['model[.]layers[.]2'],
    ['model.layers.2.mlp.up_proj.weight[0:64]'],  # a range covering every row
    ['model.layers.1.self_attn.q_proj.weight[2:5]', 'model.layers.1.self_attn.q_proj.weight[3]'],
    ['model.layers.3.mlp.down'],  # a prefix of a module name: re.match is not anchored at the end
]

MINILM_CASES = [
    ['classifier'],
    ['bert.encoder.layer.5'],
    ['bert.embeddings.word_embeddings.weight[30000:]'],
    ['bert.encoder.layer.[45].attention'],
    ['bert.encoder.layer.1.output.LayerNorm', 'bert.pooler'],
    ['bert.embeddings.position_embeddings.weight[0:128]', 'bert.embeddings.position_embeddings.weight[64:256]'],
    ['.+bias$'],
    ['bert.encoder.layer.0.attention.self.query.weight[0:10]', 'bert.encoder.layer.0.attention.self.query'],
    ['bert.embeddings.token_type_embeddings.weight[1]'],
    [r'bert.encoder.layer.\d.intermediate.dense.weight[0:100]'],
    ['bert.encoder.layer.2.attention.output.dense.bias[0:384]', 'classifier.bias[2:4]'],
    ['bert.embeddings.LayerNorm', 'bert.encoder.layer.0.output.LayerNorm.weight$'],
    ['bert.encoder.layer.3.attention.self.(key|value).weight[100:]'],
    ['bert.encoder.layer.1.attention'],
]


def _row_masks(model, patterns):
    selection = select_parameters(user_module(model), trainable=patterns)
    return {name: t.trainable_row_mask() for name, t in selection.items()}


def _assert_same_masks(ours, theirs, patterns):
    assert list(ours) == list(theirs)
    different = [name for name in ours if not bool((ours[name] == theirs[name]).all())]
    assert not different, f'{patterns}: masks differ from axolotl on {different}'


@pytest.mark.parametrize('patterns', DECODER_CASES, ids=[' '.join(case) for case in DECODER_CASES])
def test_decoder_mask_equals_axolotl(decoder, patterns):
    theirs = axolotl_row_masks(shapes_of(decoder), patterns)
    assert any(mask.any() for mask in theirs.values()), 'each case selects something'
    _assert_same_masks(_row_masks(decoder, patterns), theirs, patterns)


@pytest.mark.parametrize('patterns', MINILM_CASES, ids=[' '.join(case) for case in MINILM_CASES])
def test_minilm_mask_equals_axolotl(minilm, patterns):
    theirs = axolotl_row_masks(shapes_of(minilm), patterns)
    assert any(mask.any() for mask in theirs.values())
    _assert_same_masks(_row_masks(minilm, patterns), theirs, patterns)


def test_all_cases_together_equal_axolotl(decoder, minilm):
    """Union of many patterns at once (ranges from several patterns on one tensor merge)."""
    for model, cases in ((decoder, DECODER_CASES), (minilm, MINILM_CASES)):
        patterns = [p for case in cases for p in case]
        _assert_same_masks(_row_masks(model, patterns), axolotl_row_masks(shapes_of(model), patterns), 'all')


NAMES = ['a.b', 'axb', 'a.bc', 'xa.b', 'a..b', 'model.layers.10.mlp', 'model.layers.1.mlp', 'model_layers_1']


@pytest.mark.parametrize(
    'pattern',
    [
        'a.b',
        'a.b$',
        '^a.b$',
        'a.+',
        '.+b',
        'a\\.b',
        'model.layers.1',
        'model.layers.1.',
        'model.layers.1$',
        'model.layers.1[0-9]',
        'a..b',
        'a.*',
        'b',
    ],
)
def test_name_matching_equals_axolotl(pattern):
    """Literal dots, anchoring at the start only, '$', '.+' — decided per name exactly as axolotl does."""
    (parsed,) = parse_patterns([pattern], 'axolotl', 'trainable')
    assert [name for name in NAMES if parsed.matches(name)] == [
        name for name in NAMES if axolotl_matches(name, pattern)
    ]


def test_dot_is_literal_and_match_is_anchored_at_start():
    (dotted,) = parse_patterns(['a.b'], 'axolotl', 'trainable')
    assert dotted.matches('a.b') and dotted.matches('a.bc') and not dotted.matches('axb')
    assert not dotted.matches('xa.b')


def test_regex_syntax_searches_anywhere_without_rewriting_dots():
    (searched,) = parse_patterns(['layers.1.mlp'], 'regex', 'trainable')
    assert searched.matches('model.layers.1.mlp.up_proj.weight')
    assert searched.matches('model_layers_1_mlp')  # '.' is any character here
    (anchored,) = parse_patterns([r'\.mlp\.up_proj\.weight$'], 'regex', 'trainable')
    assert anchored.matches('model.layers.0.mlp.up_proj.weight')
    assert not anchored.matches('model.layers.0.mlp.up_proj.weight.x')


def test_regex_syntax_on_decoder(decoder):
    selection = select_parameters(
        user_module(decoder), trainable=[r'layers\.[23]\..*proj', 'embed_tokens.weight[0:5]'], syntax='regex'
    )
    trainable = {name for name, t in selection.items() if t.trainable_rows}
    expected = {n for n in shapes_of(decoder) if ('layers.2.' in n or 'layers.3.' in n) and 'proj' in n}
    assert trainable == expected | {'model.embed_tokens.weight'}
    assert selection['model.embed_tokens.weight'].trainable_rows == ((0, 5),)
