"""Recipe algorithm names resolve through one registry: ours, Composer's, and third-party entry points."""

from importlib.metadata import EntryPoint

import pytest
from composer.algorithms import EMA, GradientClipping
from composer.algorithms import LayerFreezing as ComposerLayerFreezing

from composer_thaw.core import registry
from composer_thaw.core.validation import ConfigError


def test_composer_algorithms_resolve_under_their_folder_names():
    table = registry.algorithm_registry()
    assert table['gradient_clipping'].load() is GradientClipping
    assert table['ema'].load() is EMA
    assert table['composer_layer_freezing'].load() is ComposerLayerFreezing
    assert 'low_precision_layernorm' in table and 'gated_linear_units' in table


def test_our_four_algorithms_take_their_names():
    table = registry.algorithm_registry()
    assert registry.our_algorithm_names() == ['layer_freezing', 'regex_freeze', 'hift_rotation', 'lora_inject']
    for name in registry.our_algorithm_names():
        assert table[name].source == 'composer-thaw'
        assert table[name].load().__module__.startswith(f'composer_thaw.{name}')


def test_build_algorithm_passes_options_through():
    algorithm = registry.build_algorithm('gradient_clipping', {'clipping_type': 'norm', 'clipping_threshold': 0.5})
    assert isinstance(algorithm, GradientClipping)
    assert algorithm.clipping_threshold == 0.5


def test_misspelled_name_suggests_the_closest():
    with pytest.raises(ConfigError) as error:
        registry.build_algorithm('gradient_cliping', {})
    assert "Did you mean 'gradient_clipping'" in str(error.value)
    assert error.value.key == 'algorithms.gradient_cliping'


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ConfigError, match='valid options: clipping_type, clipping_threshold'):
        registry.build_algorithm('gradient_clipping', {'clip': 1.0})


def test_entry_points_extend_the_registry(monkeypatch):
    point = EntryPoint(
        name='my_clipping', value='composer.algorithms:GradientClipping', group=registry.ENTRY_POINT_GROUP
    )

    def fake_entry_points(group):
        return [point] if group == registry.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(registry, 'entry_points', fake_entry_points)
    registry.algorithm_registry.cache_clear()
    try:
        assert registry.algorithm_registry()['my_clipping'].load() is GradientClipping
    finally:
        registry.algorithm_registry.cache_clear()
