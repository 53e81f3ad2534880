"""The ``hift`` package as a reference: its grouping (loaded by file path, since ``import hift`` fails with this
transformers) and a transcription of ``HiFTrainer``'s queue and parameter selection."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import torch

_HIFT_FILE = (
    Path(sys.prefix)
    / 'lib'
    / f'python{sys.version_info.major}.{sys.version_info.minor}'
    / 'site-packages'
    / 'hift'
    / 'registerCallBack.py'
)


def hift_callbacks():
    """``hift.registerCallBack`` loaded from its file (``GetCallBack``, ``BERTCallBack``, ...)."""
    spec = importlib.util.spec_from_file_location('hift_register_callback', _HIFT_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hift_handler(model_name: str, task: str, freeze_layers=(), strategy: str = 'down2up'):
    """The package's per-model handler, as ``HiFTrainer`` builds it: ``GetCallBack(name)(freeze, strategy, task)``."""
    from peft import TaskType

    module = hift_callbacks()
    return module.GetCallBack(model_name)([str(i) for i in freeze_layers], strategy, getattr(TaskType, task))


def hift_unit_parameters(handler, model: torch.nn.Module) -> list[list[str]]:
    """The parameter names of each unit ``group_model`` returns, selected as ``HiFTrainer.update_parameter_state``
    selects the trainable parameters for a one-element group."""
    elements = handler.group_model(model)
    pattern = '|'.join(handler.pattern_list)
    units = []
    for element in elements:
        names = [
            name
            for name, _ in model.named_parameters()
            if handler.check_selection([element], re.compile(pattern).findall(name))
        ]
        units.append(names)
    return units


def hift_visiting_order(elements: list, group_element: int, steps: int) -> list[tuple]:
    """The group of elements ``HiFTrainer`` trains at each of ``steps`` training steps (its ``select_element`` queue:
    take the first ``group_element`` elements, move them to the tail; the counter restarts every
    ``len(elements) // group_element`` steps)."""
    queue = list(elements)
    order = []
    for _ in range(steps):
        head = queue[:group_element]
        queue = queue[group_element:] + head
        order.append(tuple(head))
    return order
