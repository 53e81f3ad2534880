"""Every algorithm's constructor checks its keyword arguments as ``thaw run`` does, so ``cls(**kwargs)`` from an
llm-foundry YAML gets the same message as a recipe: an unknown option gets the closest valid ones and the full
list, a wrong type names the argument. The checks keep the constructor's signature, annotations, ``repr`` round
trips, pickling and copying."""

from __future__ import annotations

import copy
import inspect
import pickle
import typing
from typing import Any

import pytest
from composer.core import Algorithm

from composer_thaw.core.registry import algorithm_registry, build_algorithm, our_algorithm_names, registered_name
from composer_thaw.core.state import ConfigRepr, config_key, eval_repr
from composer_thaw.core.validation import ConfigError, ConfigTypeError, _matches

NAMES = our_algorithm_names()
WRONG_TYPE_CANDIDATES = ({'not': 'valid'}, 3.5, 'not-valid', [object])


def _cls(name: str) -> type:
    return algorithm_registry()[name].load()


def _options(name: str) -> list[str]:
    return list(inspect.signature(_cls(name)).parameters)


def _example(name: str) -> dict[str, Any]:
    import importlib

    return dict(importlib.import_module(_cls(name).__module__).EXAMPLES[0])


def _misspelled(option: str) -> str:
    """``option`` with two of its letters swapped (``'lora_alpha'`` -> ``'lroa_alpha'``)."""
    return option[0] + option[2] + option[1] + option[3:]


def _direct_error(name: str, kwargs: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as error:
        _cls(name)(**kwargs)
    return error.value


def _built_error(name: str, kwargs: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as error:
        build_algorithm(name, kwargs)
    return error.value


def test_there_are_four_of_ours():
    assert NAMES == ['layer_freezing', 'regex_freeze', 'hift_rotation', 'lora_inject']


@pytest.mark.parametrize('name', NAMES)
def test_a_misspelled_option_names_the_closest_and_lists_the_valid_ones(name):
    option = max(_options(name), key=len)
    kwargs = {**_example(name), _misspelled(option): 1}
    error = _direct_error(name, kwargs)
    message = str(error)
    assert f'did you mean {option!r}' in message, message
    assert f'valid options: {", ".join(_options(name))}.' in message
    assert error.key == f'algorithms.{name}.{_misspelled(option)}'
    assert isinstance(error, TypeError), 'code catching the TypeError of an unexpected keyword must still catch it'
    assert message == str(_built_error(name, kwargs))


@pytest.mark.parametrize('name', NAMES)
def test_a_wrong_type_names_the_argument_and_reads_as_from_build_algorithm(name):
    hints = typing.get_type_hints(_cls(name).__init__)
    for option in _options(name):
        wrong = next((v for v in WRONG_TYPE_CANDIDATES if option in hints and not _matches(v, hints[option])), None)
        if wrong is None:
            continue
        kwargs = {**_example(name), option: wrong}
        error = _direct_error(name, kwargs)
        assert isinstance(error, ConfigTypeError) and isinstance(error, TypeError)
        assert error.key == f'algorithms.{name}.{option}'
        assert str(error).startswith(f'algorithms.{name}.{option} = {wrong!r}: expected ')
        assert str(error) == str(_built_error(name, kwargs))


def test_an_option_that_is_no_misspelling_gets_no_suggestion():
    error = _direct_error('lora_inject', {'zzz': 1})
    assert 'did you mean' not in str(error) and 'valid options: config, r, lora_alpha' in str(error)


def test_lora_rank_as_peft_users_misspell_it():
    assert "'r'" in str(_direct_error('lora_inject', {'rank': 8})).partition('; valid options')[0]


def test_what_the_constructors_accepted_before_still_passes_the_checks():
    from composer_thaw.lora_inject import LoRAInject

    assert LoRAInject(target_modules={'q_proj', 'v_proj'}).config.target_modules == ['q_proj', 'v_proj']  # a set
    assert LoRAInject(r=4, lora_alpha=16).lora_alpha == 16  # an int where a float is annotated


def test_positional_arguments_are_checked_too():
    from composer_thaw.regex_freeze import RegexFreeze

    assert RegexFreeze(['lm_head']).trainable == ['lm_head']
    with pytest.raises(ConfigTypeError, match=r"^algorithms\.regex_freeze\.trainable = 'lm_head': expected"):
        RegexFreeze('lm_head')


@pytest.mark.parametrize('name', NAMES)
def test_signature_annotations_repr_pickle_and_copy_are_kept(name):
    cls = _cls(name)
    assert registered_name(cls) == name and config_key(cls) == f'algorithms.{name}'
    assert list(inspect.signature(cls).parameters) == _options(name) and 'self' not in _options(name)
    assert inspect.signature(cls.__init__) == inspect.signature(cls.__init__.__wrapped__)
    assert typing.get_type_hints(cls.__init__) == typing.get_type_hints(cls.__init__.__wrapped__)
    assert cls.__init__.__doc__ == cls.__init__.__wrapped__.__doc__
    algorithm = build_algorithm(name, _example(name))
    assert eval_repr(repr(algorithm)) == algorithm
    assert pickle.loads(pickle.dumps(algorithm)) == algorithm
    assert copy.deepcopy(algorithm) == algorithm


def test_the_errors_pickle_with_their_key():
    error = _direct_error('lora_inject', {'rank': 8})
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is ConfigTypeError and str(again) == str(error) and again.key == error.key


class _Unregistered(ConfigRepr, Algorithm):
    def __init__(self, patterns: list[str], scale: float = 1.0):
        self.patterns, self.scale = patterns, scale

    def match(self, event, state):
        return False

    def apply(self, event, state, logger):
        return None


class _Subclass(_Unregistered):
    """Takes ``**kwargs`` for its parent: its own check accepts any name, its parent's checks them."""

    def __init__(self, extra: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.extra = extra


def test_an_unregistered_algorithm_and_a_subclass_with_kwargs_are_checked_under_their_class_names():
    with pytest.raises(ConfigTypeError, match=r"^_Unregistered\.scael = 2: .*did you mean 'scale'"):
        _Unregistered(['x'], scael=2)
    with pytest.raises(ConfigTypeError, match=r'^_Unregistered = \{\}: _Unregistered needs patterns'):
        _Unregistered()
    assert _Subclass(extra=1, patterns=['x']).scale == 1.0
    with pytest.raises(ConfigTypeError, match=r"^_Unregistered\.scael = 2: .*did you mean 'scale'"):
        _Subclass(patterns=['x'], scael=2)
    with pytest.raises(ConfigTypeError, match=r"^_Subclass\.extra = 'one': expected an integer"):
        _Subclass(extra='one', patterns=['x'])
