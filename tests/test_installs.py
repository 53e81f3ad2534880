"""The two installs (issue #25): ``make demo`` installs the package alone, ``make test`` adds the extras, both with the
versions of constraints.txt; ``make test-current`` installs Composer and the package without their pins and then
what they require, by name (tests/current_stack.py)."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

from current_stack import requirement_names
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def setup_cfg_requirements() -> list[tuple[str, Requirement]]:
    """(where, requirement) for install_requires and every extra of setup.cfg."""
    config = configparser.ConfigParser()
    config.read(ROOT / 'setup.cfg')
    found = [('install_requires', line) for line in config['options']['install_requires'].splitlines()]
    for extra, lines in config['options.extras_require'].items():
        found += [(f'extra {extra}', line) for line in lines.splitlines()]
    return [(where, Requirement(line)) for where, line in found if line.strip()]


def constraint_pins() -> dict[str, str]:
    """constraints.txt's pin for each distribution, where its marker holds on this interpreter."""
    pins = {}
    for line in (ROOT / 'constraints.txt').read_text().splitlines():
        line = line.split('#')[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate():
            (specifier,) = requirement.specifier
            assert specifier.operator == '==', f'constraints.txt pins exact versions: {line!r}'
            pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def test_constraints_pin_a_version_every_requirement_of_setup_cfg_allows():
    """A requirement changed in setup.cfg without `make constraints` fails here (and the installs with it)."""
    pins = constraint_pins()
    for where, requirement in setup_cfg_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f'setup.cfg {where}: {requirement} is not in constraints.txt (run make constraints)'
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f'setup.cfg {where}: {requirement}, but constraints.txt pins {name}=={pins[name]} (run make constraints)'
        )


def test_constraints_hold_the_pinned_stack_llm_foundry_resolves():
    pins = constraint_pins()
    assert pins['llm-foundry'] == '0.22.0'
    assert pins['mosaicml'] == '0.32.1'
    assert pins['transformers'].startswith('4.51.')
    assert pins['torch'] == '2.7.0'


def test_the_current_stack_names_every_requirement_without_a_version():
    names = requirement_names('composer-thaw', ('test', 'peers'))
    assert {'torch', 'transformers', 'peft', 'pytest-xdist'} <= {canonicalize_name(n) for n in names}
    assert not any(re.search(r'[<>=!~]', name.split(';')[0]) for name in names), names
    assert 'mosaicml' not in names, 'Composer is installed with --no-deps; its requirements are listed instead'
    composer = {canonicalize_name(n) for n in requirement_names('mosaicml', ('nlp',))}
    assert {'torch', 'torchvision', 'torchmetrics', 'datasets', 'transformers'} <= composer
    assert 'mlflow' not in composer, "extras other than Composer's nlp are left out"


def test_the_current_stack_script_imports_only_the_standard_library():
    """It runs in the new venv before the packages it lists are installed."""
    tree = ast.parse((ROOT / 'tests' / 'current_stack.py').read_text())
    imported = {
        alias.name.split('.')[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split('.')[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported - {'__future__'} <= set(sys.stdlib_module_names), imported


def test_the_current_stack_reports_the_installed_versions():
    done = subprocess.run(
        [sys.executable, str(ROOT / 'tests' / 'current_stack.py'), 'versions'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f'torch {importlib.metadata.version("torch")}' in done.stdout
    assert f'transformers {importlib.metadata.version("transformers")}' in done.stdout
