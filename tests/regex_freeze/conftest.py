"""Fixtures for RegexFreeze tests: parameter shapes of the built-in decoder and of MiniLM."""

from __future__ import annotations

import pytest
import support

from composer_thaw.utils.parameter_selection import user_module


@pytest.fixture(scope='session')
def decoder():
    """The built-in LLaMA-style decoder (4 layers, hidden 32) as a Composer model."""
    return support.seeded_tiny_decoder()


@pytest.fixture(scope='session')
def minilm():
    """The embedded all-MiniLM-L6-v2 classifier (loaded once; tests must not change it)."""
    from composer_thaw.models.builtin import minilm_classifier

    return minilm_classifier(num_labels=6)


def shapes_of(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in user_module(model).named_parameters()}
