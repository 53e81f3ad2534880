"""Parameter names are the user's own, and models split into embeddings, blocks and trailing units."""

import pytest
from torch import nn

from composer_thaw.models import minilm_classifier, tiny_decoder
from composer_thaw.parameter_selection import (
    closest_names,
    find_repeated_blocks,
    parameter_aliases,
    split_into_units,
    user_module,
)


def test_user_module_strips_composer_and_ddp_wrappers():
    model = tiny_decoder(num_layers=2, hidden_size=16)
    inner = user_module(model)
    assert 'lm_head.weight' in dict(inner.named_parameters())
    assert user_module(inner) is inner


def test_minilm_units_follow_hift_order():
    units = split_into_units(user_module(minilm_classifier(num_labels=3)))
    assert [u.name for u in units] == ['bert.embeddings'] + [f'bert.encoder.layer.{i}' for i in range(6)] + [
        'bert.pooler',
        'classifier',
    ]
    assert [u.kind for u in units][:2] == ['embedding', 'block']


def test_llama_units_and_every_parameter_in_exactly_one_unit():
    inner = user_module(tiny_decoder('llama', num_layers=3, hidden_size=16))
    units = split_into_units(inner)
    assert [u.name for u in units] == [
        'model.embed_tokens',
        'model.layers.0',
        'model.layers.1',
        'model.layers.2',
        'model.norm',
        'lm_head',
    ]
    names = [n for u in units for n in u.parameter_names]
    assert sorted(names) == sorted(dict(inner.named_parameters()))


def test_tied_weights_belong_to_the_first_unit_and_are_aliased():
    inner = user_module(tiny_decoder('gpt2', num_layers=2, hidden_size=16, tie_word_embeddings=True))
    units = split_into_units(inner)
    assert units[0].kind == 'embedding' and 'transformer.wte.weight' in units[0].parameter_names
    assert 'lm_head.weight' in parameter_aliases(inner)['transformer.wte.weight']


def test_model_without_repeated_blocks_gets_a_clear_error():
    with pytest.raises(ValueError, match='No repeated blocks found in Sequential'):
        split_into_units(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
    assert find_repeated_blocks(nn.Linear(2, 2)) is None


def test_closest_names_suggests_similar_parameters():
    names = ['model.layers.0.mlp.up_proj.weight', 'lm_head.weight', 'model.norm.weight']
    assert closest_names('lm_haed.weight', names)[0] == 'lm_head.weight'
