"""The stack ``make test-current`` tests on: the newest torch, transformers, peft and datasets the package index has,
with Composer 0.32.1 (its last release, which caps torch below 2.7.1) and this package installed without their pins.

``python tests/current_stack.py requirements`` prints, one a line, what the second install names once mosaicml and
this package are in with ``--no-deps``: every distribution Composer (with its ``nlp`` extra) and this package (with
its ``test`` and ``peers`` extras) require, by name only, so the newest versions that go together come.
``python tests/current_stack.py versions`` prints the versions a venv has of the packages the README names.

Runs in the new venv before its dependencies are, so it uses the standard library only."""

from __future__ import annotations

import importlib.metadata
import re
import sys

# Installed with --no-deps by the Makefile: their requirements are what this script lists.
PINNED = ('mosaicml', 'composer-thaw')
EXTRAS = {'mosaicml': ('nlp',), 'composer-thaw': ('test', 'peers')}
# The versions `make test-current` reports, in this order.
REPORTED = ('torch', 'transformers', 'peft', 'datasets', 'huggingface-hub', 'torchvision', 'torchmetrics', 'mosaicml')


def normalized(name: str) -> str:
    return re.sub(r'[-_.]+', '-', name).lower()


def requirement_names(distribution: str, extras: tuple[str, ...]) -> list[str]:
    """The names of the distributions ``distribution`` requires, with ``extras``; markers other than an extra are
    left to the installer (it is given ``name; marker``)."""
    names = []
    for requirement in importlib.metadata.requires(distribution) or ():
        spec, _, marker = requirement.partition(';')
        extra = re.search(r'extra\s*==\s*[\'"]([^\'"]+)[\'"]', marker)
        if extra and extra.group(1) not in extras:
            continue
        name = re.match(r'\s*([A-Za-z0-9][A-Za-z0-9._-]*)', spec)
        assert name, f'{distribution} requires {requirement!r}: no distribution name'
        if normalized(name.group(1)) in PINNED:
            continue
        rest = re.sub(r'\s*extra\s*==\s*[\'"][^\'"]+[\'"]\s*', '', marker).strip()
        rest = re.sub(r'^(and|or)\s+|\s+(and|or)$', '', rest).strip()
        names.append(f'{name.group(1)}; {rest}' if rest else name.group(1))
    return names


def main(argv: list[str]) -> int:
    if argv == ['requirements']:
        names = {normalized(n): n for d in PINNED for n in requirement_names(d, EXTRAS[d])}
        print(*sorted(names.values()), sep='\n')
        return 0
    if argv == ['versions']:
        found = []
        for name in REPORTED:
            try:
                found.append(f'{name} {importlib.metadata.version(name)}')
            except importlib.metadata.PackageNotFoundError:
                found.append(f'{name} (not installed)')
        print(f'Python {sys.version.split()[0]}:', ', '.join(found))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
