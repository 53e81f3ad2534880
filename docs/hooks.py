"""MkDocs hook: pages made from the repository at build time, so nothing is copied into docs/ by hand.

- ``algorithms/<name>.md``: each algorithm's method card, ``algorithms/<name>/README.md``, as it is.
- ``api/<module>.md``: one API reference page per module and sub-package of ``composer_thaw`` (mkdocstrings
  renders the docstrings; a sub-package's page holds each of its modules), found by listing the package, so a
  new module gets its page without editing anything.
- ``benchmarks/results/*.png``: the benchmark plots, at the same paths as in the repository.
- ``css/pygments.css``: the code highlighting style (the theme's highlight.js would load from a CDN).

The "Algorithms" and "API reference" sections of the navigation are filled in here; every other page is listed
in ``mkdocs.yml``.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'algorithms'
ALGORITHMS_SECTION = 'Algorithms'
API_SECTION = 'API reference'


def _algorithm_cards() -> list[Path]:
    return sorted(PACKAGE.glob('*/README.md'))


def _assigned(path: Path, name: str) -> object | None:
    """The literal value a module file assigns to ``name`` at top level, read without importing it, or ``None``."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def _declared_all(path: Path) -> list[str] | None:
    """The module's ``__all__``; ``None`` when it has none."""
    declared = _assigned(path, '__all__')
    return None if declared is None else list(declared)


def _directive(name: str, **options: object) -> str:
    lines = [f'::: {name}']
    if options:
        lines.append('    options:')
        lines += [f'      {key}: {value}' for key, value in options.items()]
    return '\n'.join(lines) + '\n'


def _api_pages() -> dict[str, str]:
    """``api/<name>.md`` -> its Markdown: the package ``composer_thaw`` and each of its modules and sub-packages.

    A module's page renders what its ``__all__`` names. A sub-package's page renders what the sub-package exports
    (its ``__all__``), then each of its modules: the docstring and whatever the module declares public that the
    sub-package does not re-export, so every public object is documented once.
    """
    pages = {
        'api/composer_thaw.md': '# `composer_thaw`\n\n'
        + _directive('composer_thaw', show_root_heading='false', members='false')
        + '\n'
        + _public_names()
    }
    for module in sorted(pkgutil.iter_modules([str(PACKAGE)]), key=lambda m: m.name):
        if module.name.startswith('_'):
            continue
        name = f'composer_thaw.{module.name}'
        text = f'# `{name}`\n\n' + _directive(name, show_root_heading='false')
        if module.ispkg:
            exported = set(_declared_all(PACKAGE / module.name / '__init__.py') or ())
            text += '\n## Modules\n'
            for sub in sorted(pkgutil.iter_modules([str(PACKAGE / module.name)]), key=lambda m: m.name):
                if sub.name.startswith('_'):
                    continue
                declared = _declared_all(PACKAGE / module.name / f'{sub.name}.py')
                if declared is None:  # no __all__: the public filter decides, as for any module
                    text += '\n' + _directive(f'{name}.{sub.name}', heading_level=3)
                    continue
                extra = [member for member in declared if member not in exported]
                text += '\n' + _directive(f'{name}.{sub.name}', heading_level=3, members=extra or 'false')
        pages[f'api/{module.name}.md'] = text
    return pages


def _public_names() -> str:
    """The names ``composer_thaw`` exports (its ``_PUBLIC`` table: name -> sub-package), each linked to its page."""
    public = _assigned(PACKAGE / '__init__.py', '_PUBLIC')
    lines = ['Public names (`from composer_thaw import ...`):', '']
    lines += [f'- [`{name}`][{module}.{name}] (`{module}`)' for name, module in public.items()]
    return '\n'.join(lines) + '\n'


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    cards = [f'algorithms/{path.parent.name}.md' for path in _algorithm_cards()]
    api = list(_api_pages())
    nav = list(config.nav or [])
    position = next(
        (
            i + 1
            for i, item in enumerate(nav)
            if item == 'index.md' or (isinstance(item, dict) and 'index.md' in item.values())
        ),
        0,
    )
    nav.insert(position, {ALGORITHMS_SECTION: cards})
    nav.append({API_SECTION: api})
    config.nav = nav
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for path in _algorithm_cards():
        files.append(File.generated(config, f'algorithms/{path.parent.name}.md', abs_src_path=str(path)))
    for uri, text in _api_pages().items():
        files.append(File.generated(config, uri, content=text))
    for path in sorted((REPO / 'benchmarks' / 'results').glob('*.png')):
        files.append(File.generated(config, path.relative_to(REPO).as_posix(), abs_src_path=str(path)))
    from pygments.formatters import HtmlFormatter

    css = HtmlFormatter(style='default').get_style_defs('.highlight')
    files.append(File.generated(config, 'css/pygments.css', content=css))
    return files
