"""Compatibility between algorithms is declared in one place (``composer_thaw.core.compatibility``) from what each
algorithm owns, so no algorithm imports another: every module under an algorithm folder is parsed and its imports
checked; the declared table gives the refused and composing pairs; a third party's declaration takes part."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from composer.core import Algorithm

import composer_thaw
from composer_thaw.core.compatibility import (
    ADAPTERS,
    BASE_PARAMETERS,
    Claim,
    check_compatibility,
    claims_of,
    compatibility_table,
    conflict,
)
from composer_thaw.core.state import ConfigRepr
from composer_thaw.hift_rotation import HiFTRotation
from composer_thaw.layer_freezing import LayerFreezing
from composer_thaw.lora_inject import LoRAInject
from composer_thaw.regex_freeze import RegexFreeze

PACKAGE = Path(composer_thaw.__file__).resolve().parent
ALGORITHM_FOLDERS = sorted(p.parent.name for p in PACKAGE.glob('*/metadata.json'))  # one per algorithm, as Composer's


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports (anywhere in the file, relative imports resolved); ``from composer_thaw import
    X`` counts as importing the sub-package that defines ``X``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # package is the module's package: `from . import x` stays in it, `from .. import x` goes up one
                parts = package.split('.')
                parent = '.'.join(parts[: len(parts) - node.level + 1])
                module = f'{parent}.{node.module}' if node.module else parent
            else:
                module = node.module or ''
            modules.add(module)
            for alias in node.names:
                modules.add(f'{module}.{alias.name}')
                if module == 'composer_thaw' and alias.name in composer_thaw._PUBLIC:
                    modules.add(composer_thaw._PUBLIC[alias.name])
    return modules


def test_the_package_has_the_four_algorithm_folders():
    assert {'hift_rotation', 'layer_freezing', 'lora_inject', 'regex_freeze'} <= set(ALGORITHM_FOLDERS)


@pytest.mark.parametrize('folder', ALGORITHM_FOLDERS)
def test_no_module_under_an_algorithm_folder_imports_another_algorithm_folder(folder):
    others = [f'composer_thaw.{other}' for other in ALGORITHM_FOLDERS if other != folder]
    found = {}
    for path in sorted((PACKAGE / folder).rglob('*.py')):
        package = f'composer_thaw.{folder}'
        imported = _imported_modules(path, package)
        bad = sorted(m for m in imported if any(m == o or m.startswith(f'{o}.') for o in others))
        if bad:
            found[str(path.relative_to(PACKAGE))] = bad
    assert not found, f'algorithm modules import other algorithm folders: {found}'


def test_the_import_check_sees_function_local_and_relative_imports(tmp_path):
    module = tmp_path / 'mod.py'
    module.write_text(
        'def f():\n    from composer_thaw.regex_freeze import RegexFreeze\n'
        'from ..lora_inject import layers\nfrom composer_thaw import HiFTRotation\n'
    )
    imported = _imported_modules(module, 'composer_thaw.layer_freezing')
    assert {'composer_thaw.regex_freeze', 'composer_thaw.lora_inject', 'composer_thaw.hift_rotation'} <= imported


def test_lora_inject_and_peft_format_do_not_import_each_other():
    folder = PACKAGE / 'lora_inject'
    algorithm = _imported_modules(folder / 'lora_inject.py', 'composer_thaw.lora_inject')
    peft_format = _imported_modules(folder / 'peft_format.py', 'composer_thaw.lora_inject')
    assert not any(m.startswith('composer_thaw.lora_inject.lora_inject') for m in peft_format)
    assert not (
        any(m.startswith('composer_thaw.lora_inject.peft_format') for m in algorithm)
        and any(m.startswith('composer_thaw.lora_inject.lora_inject') for m in peft_format)
    )


LORA = LoRAInject(r=4, target_modules=['q_proj'])
HIFT = HiFTRotation()
HIFT_LORA = HiFTRotation(lora=True)
LAYER_FREEZING = LayerFreezing()
REGEX = RegexFreeze(trainable=['lm_head', 'model.norm.weight'])

# The declared table: None where the pair composes, else a fragment of the refusal.
TABLE = {
    ('LoRAInject', 'LayerFreezing'): None,
    ('LoRAInject', 'HiFTRotation(lora=True)'): None,
    ('RegexFreeze', 'LayerFreezing'): None,
    ('LoRAInject', 'RegexFreeze'): "modules_to_save=['lm_head', 'model.norm']",
    ('LoRAInject', 'HiFTRotation'): 'set lora=True',
    ('HiFTRotation', 'RegexFreeze'): 'freeze=[unit indices]',
    ('HiFTRotation', 'LayerFreezing'): 'always_trainable',
    ('HiFTRotation(lora=True)', 'LayerFreezing'): 'LayerFreezing only freezes',
    ('HiFTRotation(lora=True)', 'RegexFreeze'): 'adapter parameters',
    ('HiFTRotation(lora=True)', 'HiFTRotation'): None,  # different resources (refused as duplicates instead)
}
BY_NAME = {
    'LoRAInject': LORA,
    'HiFTRotation': HIFT,
    'HiFTRotation(lora=True)': HIFT_LORA,
    'LayerFreezing': LAYER_FREEZING,
    'RegexFreeze': REGEX,
}


@pytest.mark.parametrize('pair', TABLE, ids=['+'.join(p) for p in TABLE])
def test_the_declared_table_refuses_and_composes_in_either_order(pair):
    first, second = (BY_NAME[name] for name in pair)
    fragment = TABLE[pair]
    forward, backward = conflict(first, second), conflict(second, first)
    assert forward == backward  # the message does not depend on the order
    if fragment is None:
        assert forward is None
        return
    assert forward is not None and fragment in forward
    a, b = sorted((type(first).__name__, type(second).__name__))
    assert forward.startswith(f'{a} cannot be combined with {b}: both own ')


def test_the_table_covers_every_pair_of_our_algorithms():
    table = compatibility_table(BY_NAME.values())
    assert len(table) == 10
    refused = {pair for pair, reason in table.items() if reason is not None}
    assert len(refused) == 6


def test_check_compatibility_refuses_duplicates_and_conflicts_and_passes_composing_lists():
    check_compatibility(LORA, [LORA, LAYER_FREEZING], 'give one')
    check_compatibility(HIFT_LORA, [LORA, HIFT_LORA], 'give one')
    with pytest.raises(ValueError, match='LoRAInject appears 2 times in the algorithms list; give one'):
        check_compatibility(LORA, [LORA, LoRAInject(r=2)], 'give one')
    with pytest.raises(ValueError, match='HiFTRotation cannot be combined with LayerFreezing'):
        check_compatibility(LAYER_FREEZING, [LAYER_FREEZING, object(), HIFT], 'give one')


class FreezeHead(ConfigRepr, Algorithm):
    """A third party's algorithm that only ever freezes: it declares so, and composes or is refused by the table."""

    def __init__(self, name: str = 'lm_head'):
        self.name = name

    def owns(self) -> tuple[Claim, ...]:
        return (Claim(BASE_PARAMETERS, 'narrows', 'FreezeHead freezes once; drop it.'),)

    def match(self, event, state) -> bool:
        return False

    def apply(self, event, state, logger) -> None:
        return None


def test_a_third_party_declaration_takes_part():
    assert claims_of(FreezeHead()) == (Claim(BASE_PARAMETERS, 'narrows', 'FreezeHead freezes once; drop it.'),)
    assert conflict(FreezeHead(), LORA) is None
    assert conflict(FreezeHead(), REGEX) is None
    reason = conflict(FreezeHead(), HIFT)
    assert reason is not None and reason.startswith('FreezeHead cannot be combined with HiFTRotation')
    assert 'FreezeHead freezes once; drop it.' in reason and 'freeze=[unit indices]' in reason
    assert conflict(FreezeHead(), HIFT_LORA) is None  # the rotation runs over the adapters only


def test_algorithms_that_declare_nothing_compose_with_everything():
    from composer.algorithms import GradientClipping

    clipping = GradientClipping(clipping_type='norm', clipping_threshold=1.0)
    assert claims_of(clipping) == ()
    assert all(conflict(clipping, algorithm) is None for algorithm in BY_NAME.values())


def test_a_third_party_resource_conflicts_only_with_claims_on_it():
    class UsesCache(FreezeHead):
        def owns(self) -> tuple[Claim, ...]:
            return (Claim('kv_cache', 'sets', 'one cache owner'),)

    class AlsoCache(FreezeHead):
        def owns(self) -> tuple[Claim, ...]:
            return (Claim('kv_cache', 'rotates'),)

    assert conflict(UsesCache(), HIFT) is None
    reason = conflict(UsesCache(), AlsoCache())
    assert reason is not None and 'both own kv_cache' in reason and 'one cache owner' in reason


def test_claims_are_checked():
    with pytest.raises(ValueError, match="access='owns' is not one of"):
        Claim(ADAPTERS, 'owns')  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='resource'):
        Claim('', 'sets')

    class Bad(FreezeHead):
        def owns(self):
            return ('base_parameters',)

    with pytest.raises(TypeError, match=r'Bad.owns\(\) must return Claim objects'):
        claims_of(Bad())


def test_every_algorithm_of_ours_declares_what_it_owns():
    from conformance.harness import all_cases

    from composer_thaw.core.registry import our_algorithm_names

    ours = [case for case in all_cases() if case.name in our_algorithm_names()]
    assert {case.name for case in ours} == set(our_algorithm_names())
    for case in ours:
        claims = claims_of(case.build())
        assert claims and all(isinstance(claim, Claim) for claim in claims), case.id


def test_composer_s_layer_freezing_is_declared_here_and_composes_like_ours():
    from composer.algorithms import LayerFreezing as ComposerLayerFreezing

    composer_freezing = ComposerLayerFreezing()
    assert [c.access for c in claims_of(composer_freezing)] == ['narrows', 'narrows']
    assert conflict(composer_freezing, LORA) is None and conflict(composer_freezing, REGEX) is None
    reason = conflict(composer_freezing, HIFT)
    assert reason is not None and reason.startswith('HiFTRotation cannot be combined with LayerFreezing')
