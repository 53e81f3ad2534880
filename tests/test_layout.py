"""The package's shape (issue #23): role folders with imports that run one way, no circles, no hidden imports.

Ranks, lowest first; a module may import a lower rank, or its own folder, and nothing else of the package:

* 0 ``core/``: the notions every algorithm shares;
* 1 ``utils/``: the toolkit the algorithms are built from;
* 2 ``callbacks/``, ``models/``, ``datasets/`` and each algorithm folder (which never imports another);
* 3 ``recipes/``: the recipe application;
* 4 ``cli.py``, ``__main__.py``.

The package root (``composer_thaw/__init__.py``: lazy names, the moved-module aliases) is importable from anywhere.
An import of the package inside a function must say why on its line or the line above (``# deferred: ...``): it
defers a heavy dependency (Composer, transformers, an algorithm only one command needs).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'algorithms'
ROOT = 'composer_thaw'
ALGORITHMS = ('hift_rotation', 'layer_freezing', 'lora_inject', 'regex_freeze')
RANKS = {
    'core': 0,
    'utils': 1,
    'callbacks': 2,
    'models': 2,
    'datasets': 2,
    **dict.fromkeys(ALGORITHMS, 2),
    'recipes': 3,
    'cli': 4,
}
FLAT_MODULES = {'__init__.py', 'cli.py', '__main__.py'}
LONG_MODULE_LINES = 500


def modules() -> dict[str, Path]:
    """``composer_thaw.<dotted name>`` -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = list(path.relative_to(PACKAGE).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts = parts[:-1]
        found['.'.join([ROOT, *parts])] = path
    return found


def folder(module: str) -> str:
    """The role folder (or flat module) a module belongs to: its first name under the package (``__main__`` is the
    command line's, as ``cli`` is)."""
    parts = module.split('.')
    name = parts[1] if len(parts) > 1 else ''
    return 'cli' if name == '__main__' else name


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and 'TYPE_CHECKING' in ast.unparse(node.test)


def imports(path: Path, module: str) -> Iterator[tuple[str, int, bool]]:
    """``(imported package module, line, inside a function)`` for each import of the package in ``path``."""
    tree = ast.parse(path.read_text())
    package = module if path.name == '__init__.py' else module.rpartition('.')[0]

    def visit(node: ast.AST, in_function: bool) -> Iterator[tuple[str, int, bool]]:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split('.')[0] == ROOT:
                        yield alias.name, child.lineno, inside
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ''
                if child.level:  # relative
                    base = '.'.join(package.split('.')[: len(package.split('.')) - child.level + 1] + [base]).strip('.')
                if base.split('.')[0] != ROOT:
                    continue
                for alias in child.names:  # `from composer_thaw.models import builtin` imports a module
                    target = f'{base}.{alias.name}'
                    yield (target if target in MODULES else base), child.lineno, inside
            yield from visit(child, inside)

    yield from visit(tree, False)


MODULES = modules()
GRAPH = {module: sorted({target for target, _, _ in imports(path, module)}) for module, path in MODULES.items()}


def test_the_package_folder_holds_role_folders_and_no_other_flat_module():
    flat = {path.name for path in PACKAGE.glob('*.py')}
    assert flat <= FLAT_MODULES, f'flat modules outside the role folders: {sorted(flat - FLAT_MODULES)}'
    folders = {path.name for path in PACKAGE.iterdir() if path.is_dir() and (path / '__init__.py').exists()}
    assert folders <= set(RANKS), f'folders without a rank in this test: {sorted(folders - set(RANKS))}'


@pytest.mark.parametrize('module', sorted(MODULES))
def test_imports_run_one_way(module):
    source = folder(module)
    if not source:
        return  # the package root
    upward = []
    for target, line, _ in imports(MODULES[module], module):
        destination = folder(target)
        if not destination or destination == source:
            continue
        if RANKS[destination] >= RANKS[source]:
            upward.append(f'line {line}: {target} ({destination}, rank {RANKS[destination]})')
    assert not upward, f'{module} ({source}, rank {RANKS[source]}) imports at its rank or above: {upward}'


def test_no_import_circles():
    """Modules, not folders: within a folder too, imports form no cycle (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH.get(node, ()):
            if target not in GRAPH or target == ROOT:
                continue
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            connect(module)
    assert not circles, f'import circles: {circles}'


@pytest.mark.parametrize('module', sorted(MODULES))
def test_imports_inside_functions_say_why(module):
    path = MODULES[module]
    lines = path.read_text().splitlines()

    def explained(line: int) -> bool:  # a comment on the line, or above the imports (and blank lines) before it
        index = line - 1
        while index >= 0:
            text = lines[index].strip()
            if 'deferred' in text:
                return True
            if text and not (text.startswith(('from ', 'import ', '#')) or index == line - 1):
                return False
            index -= 1
        return False

    hidden = [
        f'line {line}: {target}' for target, line, inside in imports(path, module) if inside and not explained(line)
    ]
    assert not hidden, f'{module} imports the package inside functions without a "# deferred: why" comment: {hidden}'


@pytest.mark.parametrize('module', sorted(MODULES))
def test_a_long_module_says_why_in_its_docstring(module):
    path = MODULES[module]
    if len(path.read_text().splitlines()) <= LONG_MODULE_LINES:
        return
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ''
    assert 'Why one module' in docstring, f'{module} has over {LONG_MODULE_LINES} lines and no "Why one module" note'
