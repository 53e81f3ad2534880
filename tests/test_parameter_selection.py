"""Parameter names are the user's own, and models split into embeddings, blocks and trailing units."""

import pytest
from architectures import ARCHITECTURES, VISION
from torch import nn

from composer_thaw.core.validation import closest_names
from composer_thaw.models.builtin import minilm_classifier, tiny_decoder
from composer_thaw.utils.parameter_selection import (
    find_block_stacks,
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


def test_both_stacks_of_an_encoder_decoder_give_units_in_the_order_they_run():
    model = ARCHITECTURES['t5'].build()
    units = split_into_units(model)
    assert [(u.name, u.kind) for u in units] == [
        ('shared', 'embedding'),
        ('encoder.block.0', 'block'),
        ('encoder.block.1', 'block'),
        ('encoder.final_layer_norm', 'other'),  # runs between the stacks: a unit of its own
        ('decoder.block.0', 'block'),
        ('decoder.block.1', 'block'),
        ('decoder.final_layer_norm', 'other'),
    ]
    # The tied embedding is one parameter under four names: it belongs to the unit that runs first.
    assert units[0].parameter_names == ('shared.weight',)
    assert set(units[0].aliases) == {'shared.weight', 'encoder.embed_tokens.weight', 'decoder.embed_tokens.weight'}
    assert [stack.container for stack in find_block_stacks(model)] == ['encoder.block', 'decoder.block']


def test_what_runs_between_two_stacks_is_not_merged_into_the_embeddings():
    units = split_into_units(ARCHITECTURES['bart'].build())
    assert [u.name for u in units] == [
        'embeddings',
        'model.encoder.layers.0',
        'model.encoder.layers.1',
        'model.decoder.embed_positions',
        'model.decoder.layernorm_embedding',
        'model.decoder.layers.0',
        'model.decoder.layers.1',
    ]
    assert units[0].parameter_names == (
        'model.shared.weight',
        'model.encoder.embed_positions.weight',
        'model.encoder.layernorm_embedding.weight',
        'model.encoder.layernorm_embedding.bias',
    )


def test_a_final_norm_registered_before_the_blocks_is_a_unit_after_them():
    units = split_into_units(ARCHITECTURES['opt'].build())
    assert [u.name for u in units] == [
        'embeddings',
        'model.decoder.layers.0',
        'model.decoder.layers.1',
        'model.decoder.final_layer_norm',
    ]
    assert units[0].parameter_names == ('model.decoder.embed_tokens.weight', 'model.decoder.embed_positions.weight')


def test_resnet_units_are_the_stem_each_block_of_every_stage_and_the_head():
    model = VISION['resnet18'].build()
    units = split_into_units(model)
    assert [u.name for u in units] == ['stem'] + [f'layer{s}.{b}' for s in (1, 2, 3, 4) for b in (0, 1)] + ['fc']
    assert units[0].parameter_names == ('conv1.weight', 'bn1.weight', 'bn1.bias')
    assert sorted(n for u in units for n in u.parameter_names) == sorted(dict(model.named_parameters()))


def test_vit_units_put_the_patch_projection_class_token_and_position_embedding_first():
    units = split_into_units(VISION['vit'].build())
    assert [u.name for u in units] == [
        'embeddings',
        'encoder.layers.encoder_layer_0',
        'encoder.layers.encoder_layer_1',
        'encoder.ln',
        'heads',
    ]
    assert units[0].parameter_names == ('class_token', 'conv_proj.weight', 'conv_proj.bias', 'encoder.pos_embedding')


class _HeadFirst(nn.Module):
    """Registers a tied output head before its embedding, and a mixture of experts inside each block."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 10, bias=False)
        self.embed = nn.Embedding(10, 4)
        self.head.weight = self.embed.weight
        self.blocks = nn.ModuleList([_Experts(), _Experts()])

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class _Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)])

    def forward(self, x):
        return sum(expert(x) for expert in self.experts)


def test_a_tied_weight_belongs_to_the_unit_that_runs_first_whatever_name_registers_it():
    model = _HeadFirst()
    units = split_into_units(model)
    assert [u.name for u in units] == ['embed', 'blocks.0', 'blocks.1']  # the head owns nothing of its own
    assert units[0].parameter_names == ('head.weight',) and units[0].aliases == ('embed.weight',)
    assert [s.container for s in find_block_stacks(model)] == ['blocks']  # the experts inside a block are no stack


def test_a_module_the_forward_never_reaches_keeps_its_registered_place_after_the_blocks():
    model = _HeadFirst()
    model.unused = nn.Linear(4, 4)  # registered after the blocks, never called
    assert [u.name for u in split_into_units(model)] == ['embed', 'blocks.0', 'blocks.1', 'unused']
