"""The four algorithms on 16 Hugging Face architectures (``tests/architectures.py``): decoder-only with and without
tied embeddings, GPT-2's ``Conv1D``, encoder-only classifiers, T5 and BART.

For each architecture: the units in the order they run (and equal, parameter by parameter, to the ``hift``
package's grouping where it has one for the architecture); and for each algorithm, two optimizer steps (AdamW with
weight decay) after which every frozen parameter is bit-identical, got no gradient and holds no optimizer state,
while trained ones moved. Parity: LayerFreezing freezes what Composer's LayerFreezing freezes (leaf granularity;
tied embeddings excepted, which Composer freezes through the head), LoRAInject's default targets are PEFT's and
give PEFT's outputs with the same adapter tensors.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re

import pytest
import torch
from architectures import ARCHITECTURES, Architecture, batch, loss, outputs
from torch import nn

from composer_thaw.hift_rotation import GroupRotation, rotation_units
from composer_thaw.layer_freezing import freeze_layers
from composer_thaw.lora_inject import apply_lora, load_adapter_state_dict
from composer_thaw.regex_freeze import apply_regex_freeze
from composer_thaw.utils.parameter_selection import parameter_aliases, split_into_units

NAMES = list(ARCHITECTURES)

# The units of each architecture, in the order they run.
UNITS = {
    'llama': ['model.embed_tokens', 'model.layers.0', 'model.layers.1', 'model.norm', 'lm_head'],
    'qwen2': ['model.embed_tokens', 'model.layers.0', 'model.layers.1', 'model.norm'],  # lm_head is embed_tokens
    'gemma': ['model.embed_tokens', 'model.layers.0', 'model.layers.1', 'model.norm'],
    'phi': ['model.embed_tokens', 'model.layers.0', 'model.layers.1', 'model.final_layernorm', 'lm_head'],
    'gpt2': ['embeddings', 'transformer.h.0', 'transformer.h.1', 'transformer.ln_f'],
    'gpt_neox': [
        'gpt_neox.embed_in',
        'gpt_neox.layers.0',
        'gpt_neox.layers.1',
        'gpt_neox.final_layer_norm',
        'embed_out',
    ],
    'gpt_neo': ['embeddings', 'transformer.h.0', 'transformer.h.1', 'transformer.ln_f'],
    'opt': ['embeddings', 'model.decoder.layers.0', 'model.decoder.layers.1', 'model.decoder.final_layer_norm'],
    'bloom': ['embeddings', 'transformer.h.0', 'transformer.h.1', 'transformer.ln_f'],
    'falcon': ['transformer.word_embeddings', 'transformer.h.0', 'transformer.h.1', 'transformer.ln_f'],
    'bert': ['bert.embeddings', 'bert.encoder.layer.0', 'bert.encoder.layer.1', 'bert.pooler', 'classifier'],
    'roberta': ['roberta.embeddings', 'roberta.encoder.layer.0', 'roberta.encoder.layer.1', 'classifier'],
    'distilbert': [
        'distilbert.embeddings',
        'distilbert.transformer.layer.0',
        'distilbert.transformer.layer.1',
        'pre_classifier',
        'classifier',
    ],
    'deberta-v2': ['embeddings', 'deberta.encoder.layer.0', 'deberta.encoder.layer.1', 'pooler', 'classifier'],
    't5': [
        'shared',
        'encoder.block.0',
        'encoder.block.1',
        'encoder.final_layer_norm',
        'decoder.block.0',
        'decoder.block.1',
        'decoder.final_layer_norm',
    ],
    'bart': [
        'embeddings',
        'model.encoder.layers.0',
        'model.encoder.layers.1',
        'model.decoder.embed_positions',
        'model.decoder.layernorm_embedding',
        'model.decoder.layers.0',
        'model.decoder.layers.1',
    ],
}


@pytest.fixture(scope='module')
def built() -> dict[str, nn.Module]:
    """Each architecture's model, built once for the module; tests take copies with :func:`_fresh`."""
    return {}


def _base(built: dict[str, nn.Module], name: str) -> nn.Module:
    """The module's one model of the architecture: only read it (its units are traced once and cached)."""
    if name not in built:
        built[name] = ARCHITECTURES[name].build()
    return built[name]


def _fresh(built: dict[str, nn.Module], name: str) -> nn.Module:
    return copy.deepcopy(_base(built, name))


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)


def _train_and_check_frozen(model, optimizer, arch: Architecture, frozen, steps: int = 2, before_step=None):
    """Train ``steps`` steps; ``frozen(step)`` names what must not train at that step (bit-identical across it, no
    gradient, no optimizer state). Returns the names that changed over the whole run."""
    inputs = batch(arch)
    params = dict(model.named_parameters())
    start = {name: p.detach().clone() for name, p in params.items()}
    for step in range(steps):
        if before_step is not None:
            before_step()
        names = frozen(step)
        assert names, 'a check without frozen parameters proves nothing'
        before = {name: params[name].detach().clone() for name in names}
        loss(model, inputs).backward()
        for name in names:
            assert params[name].grad is None, f'{arch.name}: frozen {name} got a gradient'
        optimizer.step()
        held = {id(p) for p, state in optimizer.state.items() if state}
        for name in names:
            assert torch.equal(params[name], before[name]), f'{arch.name}: frozen {name} changed'
            assert id(params[name]) not in held, f'{arch.name}: frozen {name} holds optimizer state'
        optimizer.zero_grad(set_to_none=True)
    return {name for name, p in params.items() if not torch.equal(p, start[name])}


# ---------------------------------------------------------------- units


@pytest.mark.parametrize('name', NAMES)
def test_units_run_in_forward_order_and_hold_every_parameter_once(built, name):
    model = _base(built, name)
    units = split_into_units(model)
    assert [u.name for u in units] == UNITS[name]
    owned = [n for u in units for n in u.parameter_names]
    assert sorted(owned) == sorted(dict(model.named_parameters()))
    aliases = [a for u in units for a in u.aliases]
    assert len(aliases) == len(set(aliases))  # every name of a parameter lies in at most one unit


@pytest.mark.parametrize('name', [n for n in NAMES if ARCHITECTURES[n].hift])
def test_units_equal_hifts_grouping_parameter_by_parameter(built, name):
    from hift_rotation.hift_reference import hift_handler, hift_unit_parameters

    model = _base(built, name)
    hift_name, task = ARCHITECTURES[name].hift
    with contextlib.redirect_stdout(io.StringIO()):  # group_model prints its groups
        theirs = hift_unit_parameters(hift_handler(hift_name, task), model)
    ours = [list(u.parameter_names) for u in rotation_units(model)]
    if name == 'opt':
        # hift lists OPT's final_layer_norm second, where OPT registers it; it runs after the layers, last here.
        assert theirs[1] == ours[-1] == ['model.decoder.final_layer_norm.weight', 'model.decoder.final_layer_norm.bias']
        theirs = [theirs[0], *theirs[2:], theirs[1]]
    assert ours == theirs


# ---------------------------------------------------------------- LayerFreezing


@pytest.mark.parametrize('name', NAMES)
def test_layer_freezing_by_block_freezes_the_first_units_for_real(built, name):
    arch, model = ARCHITECTURES[name], _fresh(built, name)
    optimizer = _adamw(model)
    units = split_into_units(_base(built, name))
    depth, _ = freeze_layers(model, optimizer, 1.0, freeze_start=0.0, freeze_level=0.7, granularity='block')
    assert depth >= 2
    first = {a for u in units[:depth] for a in u.aliases}
    expected = {n for n, aliases in parameter_aliases(model).items() if set(aliases) <= first}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == expected
    changed = _train_and_check_frozen(model, optimizer, arch, lambda step: frozen)
    assert changed == set(dict(model.named_parameters())) - frozen


@pytest.mark.parametrize('name', NAMES)
def test_layer_freezing_by_leaf_freezes_what_composers_layer_freezing_freezes(built, name):
    from composer.algorithms.layer_freezing import freeze_layers as composer_freeze_layers

    ours, theirs = _fresh(built, name), _fresh(built, name)
    freeze_layers(ours, _adamw(ours), 1.0, freeze_start=0.0, freeze_level=0.5)
    composer_freeze_layers(theirs, _adamw(theirs), 1.0, 0.0, 0.5)
    ours_frozen = {n for n, p in ours.named_parameters() if not p.requires_grad}
    theirs_frozen = {n for n, p in theirs.named_parameters() if not p.requires_grad}
    tied = {n for n, aliases in parameter_aliases(ours).items() if len(aliases) > 1}
    assert ours_frozen == theirs_frozen - tied  # Composer also freezes a tied embedding through the frozen half
    assert ours_frozen


# ---------------------------------------------------------------- RegexFreeze


@pytest.mark.parametrize('name', NAMES)
def test_regex_freeze_trains_exactly_the_last_block_and_last_unit(built, name):
    arch, model = ARCHITECTURES[name], _fresh(built, name)
    optimizer = _adamw(model)
    units = split_into_units(_base(built, name))
    last_block = [u for u in units if u.kind == 'block'][-1]
    patterns = [rf'^{re.escape(last_block.name)}\.', rf'^{re.escape(units[-1].name)}\.']
    apply_regex_freeze(model, optimizer, trainable=patterns, syntax='regex')
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == set(last_block.parameter_names) | set(units[-1].parameter_names)
    frozen = set(dict(model.named_parameters())) - trained
    assert _train_and_check_frozen(model, optimizer, arch, lambda step: frozen) == trained


# ---------------------------------------------------------------- HiFTRotation


@pytest.mark.parametrize('name', NAMES)
def test_hift_trains_one_unit_per_step_and_the_others_not_at_all(built, name):
    arch, model = ARCHITECTURES[name], _fresh(built, name)
    optimizer = _adamw(model)
    rotation = GroupRotation(model, optimizer, group_size=1)
    units = rotation.plan.units
    everything = set(dict(model.named_parameters()))
    changed = _train_and_check_frozen(
        model,
        optimizer,
        arch,
        lambda step: everything - set(units[step].parameter_names),
        before_step=rotation.before_step,
    )
    assert changed == set(units[0].parameter_names) | set(units[1].parameter_names)
    assert rotation.offloaded  # the inactive units' AdamW state left the optimizer


# ---------------------------------------------------------------- LoRAInject


def _peft_adapted(peft_model: nn.Module) -> set[str]:
    from peft.tuners.lora import LoraLayer

    inner = peft_model.base_model.model
    return {name for name, module in inner.named_modules() if isinstance(module, LoraLayer)}


@pytest.mark.parametrize('name', NAMES)
def test_lora_default_targets_are_pefts_with_pefts_outputs_and_only_adapters_train(built, name):
    import peft
    from peft.utils import get_peft_model_state_dict
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    arch, ours = ARCHITECTURES[name], _fresh(built, name)
    lora = dict(r=2, lora_alpha=4)
    if ours.config.model_type not in PEFT_DEFAULTS:  # PEFT has no default targets here: neither have we
        with pytest.raises(ValueError, match='target_modules'):
            apply_lora(ours, None, **lora)
        lora['target_modules'] = ['q_lin', 'v_lin']
    theirs = peft.get_peft_model(_fresh(built, name), peft.LoraConfig(lora_dropout=0.0, **lora))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B != 0, so the adapters change the output
        for param_name, param in theirs.named_parameters():
            if 'lora_' in param_name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)

    optimizer = _adamw(ours)
    with pytest.warns() if arch.family == 'encoder' else contextlib.nullcontext():  # the new head stays frozen
        summary = apply_lora(ours, optimizer, **lora)
    assert set(summary.adapted) == _peft_adapted(theirs)
    load_adapter_state_dict(ours, get_peft_model_state_dict(theirs))
    inputs = batch(arch)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(outputs(ours, inputs), outputs(theirs, inputs), atol=1e-5, rtol=1e-4)
    ours.train()

    adapters = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert adapters and all('lora_' in n for n in adapters)
    frozen = set(dict(ours.named_parameters())) - adapters
    assert _train_and_check_frozen(ours, optimizer, arch, lambda step: frozen) == adapters
