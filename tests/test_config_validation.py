"""Plain-data configuration is checked against annotations with messages naming key, value and what is valid."""

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from composer_thaw.core.validation import ConfigError, ConfigTypeError, check_call_kwargs, check_value, from_mapping


@dataclass
class Inner:
    rate: float = 0.1


@dataclass
class Outer:
    name: Literal['a', 'b'] = 'a'
    count: int = 1
    tags: list[str] = field(default_factory=list)
    limit: Optional[int] = None
    inner: Inner = field(default_factory=Inner)


def test_builds_nested_dataclasses_from_mappings():
    built = from_mapping(Outer, {'name': 'b', 'count': 3, 'tags': ['x'], 'inner': {'rate': 2}}, '')
    assert built == Outer(name='b', count=3, tags=['x'], inner=Inner(rate=2))


@pytest.mark.parametrize(
    ('data', 'key', 'fragment'),
    [
        ({'nmae': 'a'}, 'nmae', "did you mean 'name'"),
        ({'name': 'c'}, 'name', "one of 'a', 'b'"),
        ({'count': 'three'}, 'count', 'an integer'),
        ({'count': True}, 'count', 'an integer'),
        ({'tags': 'x'}, 'tags', 'a list of a string'),
        ({'limit': 1.5}, 'limit', 'an integer or null'),
        ({'inner': {'rate': 'fast'}}, 'inner.rate', 'a number (float)'),
        ({'inner': 3}, 'inner', 'a mapping with keys rate'),
    ],
)
def test_each_bad_value_names_its_key_and_what_is_valid(data, key, fragment):
    with pytest.raises(ConfigError) as error:
        from_mapping(Outer, data, '')
    assert error.value.key == key
    assert fragment in str(error.value)


def test_integers_are_accepted_where_floats_belong_but_not_booleans():
    check_value('x', 3, float)
    with pytest.raises(ConfigError):
        check_value('x', False, float)


class Takes:
    def __init__(self, required: int, option: Literal['on', 'off'] = 'on'):
        pass


def test_call_kwargs_report_unknown_missing_and_mistyped_options():
    check_call_kwargs('algorithms.takes', Takes, {'required': 1})
    with pytest.raises(
        ConfigTypeError, match=r"has no option 'opton' \(did you mean 'option'\?\); valid options: required, option\."
    ):
        check_call_kwargs('algorithms.takes', Takes, {'required': 1, 'opton': 'on'})
    with pytest.raises(TypeError, match="has no option 'zzz'; valid options"):  # nothing close: no suggestion
        check_call_kwargs('algorithms.takes', Takes, {'required': 1, 'zzz': 'on'})
    with pytest.raises(ConfigError, match='needs required'):
        check_call_kwargs('algorithms.takes', Takes, {})
    with pytest.raises(ConfigError, match="one of 'on', 'off'"):
        check_call_kwargs('algorithms.takes', Takes, {'required': 1, 'option': 'maybe'})


class TakesAnything:
    def __init__(self, option: int = 0, **kwargs: object):
        pass


def test_a_constructor_with_kwargs_accepts_any_name_but_checks_its_own():
    check_call_kwargs('algorithms.takes', TakesAnything, {'anything': 1})
    with pytest.raises(ConfigTypeError, match='an integer'):
        check_call_kwargs('algorithms.takes', TakesAnything, {'option': 'one'})


def test_errors_keep_their_class_under_a_prefix_and_are_value_and_type_errors():
    error = ConfigTypeError('r', '8', 'expected an integer.').under('algorithms.lora_inject')
    assert type(error) is ConfigTypeError and isinstance(error, ValueError) and isinstance(error, TypeError)
    assert str(error) == "algorithms.lora_inject.r = '8': expected an integer."
    assert not isinstance(ConfigError('k', 1, 'out of range.'), TypeError)
