"""6: bad input fails before the first batch with a message naming the argument and what is valid, and a
failed first application leaves model and optimizer untouched."""

import inspect
import typing
from typing import Any, Literal, get_args, get_origin

import pytest
import torch

from composer_thaw.core.registry import algorithm_registry, build_algorithm
from composer_thaw.core.validation import ConfigError, _matches
from conformance.harness import adamw, algorithm_module, covered_names, make_trainer, tiny_model

WRONG_TYPE_CANDIDATES = ({'not': 'valid'}, 3.5, 'not-valid', [object])


def _constructor_arguments(name: str) -> list[tuple[str, str, Any, Any]]:
    """(algorithm, argument, annotation, wrong-typed value) for every annotated constructor argument."""
    cls = algorithm_registry()[name].load()
    hints = typing.get_type_hints(cls.__init__)
    rows = []
    for argument in inspect.signature(cls.__init__).parameters:
        if argument == 'self' or argument not in hints or hints[argument] is Any:
            continue
        wrong = next((v for v in WRONG_TYPE_CANDIDATES if not _matches(v, hints[argument])), None)
        if wrong is not None:
            rows.append((name, argument, hints[argument], wrong))
    return rows


ARGUMENTS = [row for name in covered_names() for row in _constructor_arguments(name)]
ENUMS = [
    row for row in ARGUMENTS if get_origin(row[2]) is Literal or any(get_origin(a) is Literal for a in get_args(row[2]))
]


def _kwargs_with(name: str, argument: str, value: Any) -> dict[str, Any]:
    base = dict(algorithm_module(name).EXAMPLES[0])
    base[argument] = value
    return base


@pytest.mark.parametrize(
    ('name', 'argument', 'annotation', 'wrong'), ARGUMENTS, ids=[f'{r[0]}.{r[1]}' for r in ARGUMENTS]
)
def test_wrong_type_names_the_argument(name, argument, annotation, wrong):
    with pytest.raises(ConfigError) as error:
        build_algorithm(name, _kwargs_with(name, argument, wrong))
    assert argument in str(error.value)
    cls = algorithm_registry()[name].load()
    with pytest.raises((TypeError, ValueError)) as direct:
        cls(**_kwargs_with(name, argument, wrong))
    assert argument in str(direct.value), f'{cls.__name__}({argument}={wrong!r}) error does not name it'


@pytest.mark.parametrize(('name', 'argument', 'annotation', 'wrong'), ENUMS, ids=[f'{r[0]}.{r[1]}' for r in ENUMS])
def test_unknown_choice_lists_the_valid_ones(name, argument, annotation, wrong):
    literal = next(a for a in (annotation, *get_args(annotation)) if get_origin(a) is Literal)
    cls = algorithm_registry()[name].load()
    with pytest.raises(ValueError) as error:
        cls(**_kwargs_with(name, argument, 'no-such-choice'))
    message = str(error.value)
    assert argument in message and all(
        repr(choice) in message or str(choice) in message for choice in get_args(literal)
    )


def _bad_examples():
    rows = []
    for name in covered_names():
        for kwargs, fragment in getattr(algorithm_module(name), 'BAD_EXAMPLES', ()):
            rows.append((name, kwargs, fragment))
    return rows


BAD = _bad_examples()


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    return (
        {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        [type(m) for m in model.modules()],
        [[id(p) for p in g['params']] for g in optimizer.param_groups],
        len(optimizer.state),
    )


def _same(a, b) -> bool:
    params_a, modules_a, groups_a, state_a = a
    params_b, modules_b, groups_b, state_b = b
    return (
        params_a.keys() == params_b.keys()
        and all(torch.equal(params_a[k][0], params_b[k][0]) and params_a[k][1] == params_b[k][1] for k in params_a)
        and modules_a == modules_b
        and groups_a == groups_b
        and state_a == state_b
    )


@pytest.mark.parametrize(('name', 'kwargs', 'fragment'), BAD, ids=[f'{r[0]}:{r[2][:30]}' for r in BAD])
def test_bad_configuration_fails_before_training_and_leaves_model_untouched(name, kwargs, fragment):
    model = tiny_model()
    optimizer = adamw(model)
    before = _snapshot(model, optimizer)
    with pytest.raises((ValueError, TypeError)) as error:
        algorithm = build_algorithm(name, kwargs)
        trainer = make_trainer([algorithm], model=model, optimizers=optimizer, max_duration='1ba')
        trainer.fit()
    assert fragment in str(error.value)
    assert _same(before, _snapshot(model, optimizer)), 'the failed application modified the model or optimizer'


@pytest.mark.parametrize('name', covered_names())
def test_a_model_without_parameters_gets_a_clear_error_before_training(name):
    from composer.models import ComposerClassifier

    model = ComposerClassifier(torch.nn.Flatten(), num_classes=2)
    stray = torch.nn.Parameter(torch.zeros(1))
    algorithm = build_algorithm(name, algorithm_module(name).EXAMPLES[0])
    with pytest.raises((ValueError, TypeError)) as error:
        trainer = make_trainer(
            [algorithm],
            model=model,
            optimizers=torch.optim.SGD([stray], lr=0.1),
            max_duration='1ba',
            eval_dataloader=None,
        )
        trainer.fit()
    assert 'parameter' in str(error.value).lower()
