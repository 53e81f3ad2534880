"""4 (pairs of ours): each meaningful pair trains correctly; each incompatible pair is refused at Trainer
construction with an error that says what to do instead — never silent wrong training. The table is declared in
``composer_thaw.core.compatibility`` from what each algorithm owns (``tests/test_compatibility.py`` checks it pair by
pair).

| pair | result |
|---|---|
| LoRAInject + HiFTRotation(lora=True) | rotation over the adapters; the base stays bit-identical |
| LoRAInject + LayerFreezing | the adapters of frozen units stop; the base stays bit-identical |
| RegexFreeze + LayerFreezing | RegexFreeze's frozen tensors stay bit-identical; freezing grows on top |
| LoRAInject + RegexFreeze | refused: use LoRAInject(modules_to_save=[...]) for extra trainable modules |
| HiFTRotation + RegexFreeze or LayerFreezing | refused: both decide which parameters train |
| HiFTRotation (without lora=True) + LoRAInject | refused: set lora=True to rotate over the adapters |
| any algorithm of ours listed twice | refused: the later would silently override the earlier |
"""

import pytest
import torch

from composer_thaw.core.registry import build_algorithm, our_algorithm_names
from conformance.harness import adamw, first_cases, ids, make_trainer, parameters, tiny_model

LORA = ('lora_inject', {'r': 4, 'lora_alpha': 8, 'target_modules': ['q_proj', 'v_proj']})
HIFT_LORA = ('hift_rotation', {'group_size': 2, 'lora': True})
HIFT = ('hift_rotation', {'group_size': 2})
LAYER_FREEZING = ('layer_freezing', {'freeze_start': 0.0, 'freeze_level': 0.5, 'granularity': 'block', 'interval': 2})
REGEX = ('regex_freeze', {'trainable': ['lm_head', 'model.layers.2', 'model.layers.3']})

WORKING = {
    'lora+hift': (LORA, HIFT_LORA),
    'lora+layer_freezing': (LORA, LAYER_FREEZING),
    'regex_freeze+layer_freezing': (REGEX, LAYER_FREEZING),
}
REFUSED = {
    'lora+regex_freeze': (LORA, REGEX, 'modules_to_save'),
    'hift+regex_freeze': (HIFT, REGEX, 'RegexFreeze'),
    'hift+layer_freezing': (HIFT, LAYER_FREEZING, 'LayerFreezing'),
    'hift+lora': (HIFT, LORA, 'set lora=True'),
}


def _available(*specs) -> bool:
    return all(name in our_algorithm_names() for name, _ in specs)


def _build(spec):
    return build_algorithm(*spec)


def _base_names(names):
    """Parameters of the model before any surgery (LoRA keeps them under `base_layer`)."""
    return {n.replace('.base_layer', '') for n in names if 'lora_' not in n}


@pytest.mark.parametrize('pair', WORKING, ids=list(WORKING))
@pytest.mark.parametrize('order', ['listed', 'reversed'])
def test_meaningful_pairs_train_and_keep_what_must_stay_frozen(pair, order):
    first, second = WORKING[pair]
    if not _available(first, second):
        pytest.skip('an algorithm of the pair is not released')
    algorithms = [_build(first), _build(second)]
    trainer = make_trainer(algorithms if order == 'listed' else algorithms[::-1])
    initial = parameters(trainer)
    trainer.fit()
    final = parameters(trainer)
    changed = {n for n in final if not torch.equal(final[n], initial[n])}
    assert changed, 'nothing trained'
    if LORA in (first, second):
        assert all('lora_' in n for n in changed), f'base parameters moved: {sorted(changed)[:5]}'
    if REGEX in (first, second):
        allowed = ('lm_head', 'model.layers.2', 'model.layers.3')
        assert all(n.startswith(allowed) for n in changed), f'frozen parameters moved: {sorted(changed)[:5]}'


@pytest.mark.parametrize('pair', REFUSED, ids=list(REFUSED))
@pytest.mark.parametrize('order', ['listed', 'reversed'])
def test_incompatible_pairs_are_refused_before_training(pair, order):
    first, second, fragment = REFUSED[pair]
    if not _available(first, second):
        pytest.skip('an algorithm of the pair is not released')
    algorithms = [_build(first), _build(second)]
    with pytest.raises(ValueError, match=fragment):
        make_trainer(algorithms if order == 'listed' else algorithms[::-1])


@pytest.mark.parametrize('case', first_cases(), ids=ids(first_cases()))
def test_an_algorithm_listed_twice_is_refused_before_training(case):
    model = tiny_model()
    optimizer = adamw(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=f'{case.cls.__name__} appears 2 times'):
        make_trainer([case.build(), case.build()], model=model, optimizers=optimizer)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
