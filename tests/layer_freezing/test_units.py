"""What is frozen, in which order: Composer's leaf modules, or embeddings then blocks; tied weights and modules
with parameters of their own follow the rule 'a parameter is frozen once every module using it is frozen'."""

from __future__ import annotations

import torch
from composer.algorithms.layer_freezing import freeze_layers as composer_freeze_layers
from torch import nn

from composer_thaw.layer_freezing import freezable_units, freeze_layers
from composer_thaw.utils.parameter_selection import user_module


def _trainable(model):
    return [name for name, p in user_module(model).named_parameters() if p.requires_grad]


def test_block_granularity_freezes_embeddings_first_then_blocks_and_never_the_head(make_model):
    model = make_model(num_layers=3)
    assert [u.name for u in freezable_units(user_module(model), 'block')] == [
        'model.embed_tokens',
        'model.layers.0',
        'model.layers.1',
        'model.layers.2',
    ]

    depth, _ = freeze_layers(model, None, current_duration=0.5, freeze_start=0.0, freeze_level=1.0, granularity='block')
    assert depth == 2
    assert _trainable(model)[0].startswith('model.layers.1.')

    freeze_layers(model, None, current_duration=1.0, freeze_start=0.0, freeze_level=1.0, granularity='block')
    assert _trainable(model) == ['model.norm.weight', 'lm_head.weight']


def test_block_granularity_finds_gpt2_blocks_with_both_embeddings_in_one_unit(make_model):
    units = freezable_units(user_module(make_model('gpt2', num_layers=2)), 'block')
    assert (units[0].name, units[0].parameter_names[:2]) == (
        'embeddings',
        ('transformer.wte.weight', 'transformer.wpe.weight'),
    )
    assert [u.name for u in units[1:]] == ['transformer.h.0', 'transformer.h.1']


def test_tied_input_embedding_stays_trainable_while_the_head_that_shares_it_is(make_model):
    for granularity in ('leaf', 'block'):
        model = make_model('gpt2', num_layers=2, tie_word_embeddings=True)
        freeze_layers(model, None, current_duration=1.0, freeze_start=0.0, freeze_level=1.0, granularity=granularity)
        root = user_module(model)
        assert root.lm_head.weight is root.transformer.wte.weight
        assert root.transformer.wte.weight.requires_grad, granularity
        assert not root.transformer.wpe.weight.requires_grad, granularity

    theirs = make_model('gpt2', num_layers=2, tie_word_embeddings=True)
    composer_freeze_layers(theirs, torch.optim.SGD(theirs.parameters(), lr=0.1), 1.0, 0.0, 1.0)
    assert not user_module(theirs).lm_head.weight.requires_grad  # Composer freezes the head through the tie


def test_weight_shared_by_two_early_layers_is_frozen_when_both_are():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    model[1].weight = model[0].weight

    freeze_layers(model, None, current_duration=1.0, freeze_start=0.0, freeze_level=1 / 3)  # 1 of 3 units
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ['0.bias']
    freeze_layers(model, None, current_duration=1.0, freeze_start=0.0, freeze_level=2 / 3)  # 2 of 3 units
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ['0.weight', '0.bias', '1.bias']


class _GatedBlock(nn.Module):
    """A module holding a parameter of its own next to child modules, which Composer never freezes."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.ones(4))
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x) * self.gate


def test_a_module_with_its_own_parameters_and_children_is_a_unit_before_its_children():
    model = nn.Sequential(_GatedBlock(), _GatedBlock(), nn.Linear(4, 2))
    assert [u.name for u in freezable_units(model, 'leaf')] == ['0', '0.proj', '1', '1.proj']

    freeze_layers(model, None, current_duration=1.0, freeze_start=0.0, freeze_level=1.0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ['2.weight', '2.bias']

    theirs = nn.Sequential(_GatedBlock(), _GatedBlock(), nn.Linear(4, 2))
    composer_freeze_layers(theirs, torch.optim.SGD(theirs.parameters(), lr=0.1), 1.0, 0.0, 1.0)
    assert [n for n, p in theirs.named_parameters() if p.requires_grad] == ['0.gate', '1.gate', '2.weight', '2.bias']


def test_frozen_units_stay_frozen_when_the_schedule_falls(make_model):
    model = make_model(num_layers=2)
    freeze_layers(model, None, 1.0, 0.0, 1.0, granularity='block')
    depth, _ = freeze_layers(
        model, None, 1.0, 0.0, 1.0, granularity='block', schedule=lambda elapsed, start, level: 0.0
    )
    assert depth == 0
    assert _trainable(model) == ['model.norm.weight', 'lm_head.weight']


def test_block_granularity_freezes_both_stacks_of_an_encoder_decoder_in_the_order_they_run():
    from architectures import ARCHITECTURES

    model = ARCHITECTURES['t5'].build()
    assert [u.name for u in freezable_units(model, 'block')] == [
        'shared',
        'encoder.block.0',
        'encoder.block.1',
        'encoder.final_layer_norm',  # runs between the stacks, so it is frozen there
        'decoder.block.0',
        'decoder.block.1',
    ]  # decoder.final_layer_norm runs after the last block: never frozen
    freeze_layers(model, None, current_duration=1.0, freeze_start=0.0, freeze_level=4 / 6, granularity='block')
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen[-1] == 'encoder.final_layer_norm.weight' and all(n.startswith('encoder.') for n in frozen)
    assert model.shared.weight.requires_grad  # tied to the lm_head, which is never frozen


def test_a_final_norm_registered_before_the_blocks_is_not_frozen_with_the_embeddings():
    from architectures import ARCHITECTURES

    model = ARCHITECTURES['opt'].build()
    units = freezable_units(model, 'block')
    assert [u.name for u in units] == ['embeddings', 'model.decoder.layers.0', 'model.decoder.layers.1']
    assert units[0].parameter_names == ('model.decoder.embed_tokens.weight', 'model.decoder.embed_positions.weight')
