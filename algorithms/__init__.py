"""composer-thaw: freezing, rotation and low-rank adaptation algorithms for MosaicML Composer.

Example:
    >>> from composer import Trainer
    >>> from composer_thaw import RegexFreeze
    >>> from composer_thaw.datasets.builtin import python_topics_loader
    >>> from composer_thaw.models.builtin import tiny_decoder
    >>> model = tiny_decoder(num_layers=4)  # a LLaMA-style decoder of 4.1M parameters, randomly initialized
    >>> trainer = Trainer(model=model, train_dataloader=python_topics_loader(model.tokenizer), max_duration='2ba',
    ...                   algorithms=[RegexFreeze(trainable=['lm_head', 'model.layers.3'])], progress_bar=False)
    >>> trainer.fit()
    >>> f'{sum(p.numel() for p in model.parameters() if p.requires_grad):,}'  # lm_head and the last block
    '1,994,496'
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any, Optional, Union

__version__ = '0.1.0'

# Public name -> sub-package; imported on first use so `import composer_thaw` stays light.
_PUBLIC = {
    'LayerFreezing': 'composer_thaw.layer_freezing',
    'freeze_layers': 'composer_thaw.layer_freezing',
    'RegexFreeze': 'composer_thaw.regex_freeze',
    'apply_regex_freeze': 'composer_thaw.regex_freeze',
    'HiFTRotation': 'composer_thaw.hift_rotation',
    'apply_hift_rotation': 'composer_thaw.hift_rotation',
    'LoRAInject': 'composer_thaw.lora_inject',
    'apply_lora': 'composer_thaw.lora_inject',
}

__all__ = list(_PUBLIC)


# Modules that moved into the role folders (core/, utils/, callbacks/, models/, datasets/, recipes/) in 0.2: the old
# paths keep working for one release, with a DeprecationWarning naming the new one.
MOVED_MODULES: dict[str, Union[str, tuple[str, ...]]] = {
    'algorithm_state': 'composer_thaw.core.state',
    'config_validation': 'composer_thaw.core.validation',
    'registry': 'composer_thaw.core.registry',
    'compatibility': 'composer_thaw.core.compatibility',
    'resume_compatibility': 'composer_thaw.core.resume_checks',
    'checkpointing': 'composer_thaw.core.checkpoint_algorithms',
    'adapters': 'composer_thaw.utils.adapters',
    'atomic_files': 'composer_thaw.utils.atomic_files',
    'execution_order': 'composer_thaw.utils.execution_order',
    'master_weights': 'composer_thaw.utils.master_weights',
    'optimizer_surgery': 'composer_thaw.utils.optimizer_surgery',
    'parameter_selection': 'composer_thaw.utils.parameter_selection',
    'sharding': 'composer_thaw.utils.sharding',
    'trainable_checkpoints': 'composer_thaw.utils.trainable_checkpoints',
    'sharded_checkpoints': 'composer_thaw.utils.deferred_optimizer_load',
    'loss_guard': 'composer_thaw.callbacks.loss_guard',
    'interruption': 'composer_thaw.callbacks.interruption',
    'vision': 'composer_thaw.models.vision',
    'data': 'composer_thaw.datasets.builtin',
    'local_data': 'composer_thaw.datasets.local_files',
    'recipe': 'composer_thaw.recipes.schema',
    'training': ('composer_thaw.recipes.running', 'composer_thaw.recipes.building'),  # split in two
    'run_files': 'composer_thaw.recipes.run_files',
    'memory_estimate': 'composer_thaw.recipes.memory_estimate',
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``composer_thaw.<old name>`` as the module it moved to (the same module object), with a warning."""

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        package, _, name = fullname.rpartition('.')
        if package != __name__ or name not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED_MODULES[spec.name.rpartition('.')[2]]
        names = (new,) if isinstance(new, str) else new
        warnings.warn(
            f'{spec.name} moved to {" and ".join(names)}; import from there (the old path goes in the next release).',
            DeprecationWarning,
            stacklevel=2,
        )
        if len(names) == 1:
            return importlib.import_module(names[0])
        parts = [importlib.import_module(name) for name in names]
        joined = ModuleType(spec.name, f'{spec.name}: moved to {" and ".join(names)}.')

        def find(name: str) -> Any:  # the old module's names, from whichever part has them now
            for part in parts:
                if hasattr(part, name):
                    return getattr(part, name)
            raise AttributeError(f'module {spec.name!r} has no attribute {name!r}')

        joined.__getattr__ = find  # type: ignore[method-assign]
        return joined

    def exec_module(self, module: ModuleType) -> None:
        pass  # the module it moved to is already executed


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
