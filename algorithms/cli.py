"""The ``thaw`` command.

    thaw run yamls/demo.yaml [--set optimizer.lr=1e-4 ...] [--nproc N]
    thaw algorithms                      # list registered algorithm names

Invalid recipes exit with code 2 and one paragraph naming the key, the bad value and what is valid.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Optional, Sequence

from algorithms.config_validation import ConfigError

__all__ = ['main']

EXIT_INVALID = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='thaw', description='Run composer-thaw recipes.')
    commands = parser.add_subparsers(dest='command', required=True)
    run = commands.add_parser('run', help='train from a YAML recipe')
    run.add_argument('recipe', help='path to a YAML recipe, e.g. yamls/demo.yaml')
    run.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                     help='override a recipe value (dotted path; value parsed as YAML); repeatable')
    run.add_argument('--nproc', type=int, default=1, help='number of processes (Composer launcher; gloo on CPU)')
    commands.add_parser('algorithms', help='list the algorithm names a recipe can use')
    return parser


def _launch(recipe: str, overrides: Sequence[str], nproc: int) -> int:
    """Re-run ``thaw run`` under Composer's launcher with ``nproc`` processes."""
    env = dict(os.environ)
    env.setdefault('OMP_NUM_THREADS', '1')
    command = [sys.executable, '-m', 'composer.cli.launcher', '-n', str(nproc), '-m', 'algorithms.cli', 'run', recipe]
    for override in overrides:
        command += ['--set', override]
    return subprocess.call(command, env=env)


def _run(args: argparse.Namespace) -> int:
    from algorithms.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # validates everything before any model is built
    if args.nproc < 1:
        raise ConfigError('--nproc', args.nproc, 'expected a positive number of processes.')
    if args.nproc > 1:
        return _launch(args.recipe, args.overrides, args.nproc)

    from composer.utils import dist

    from algorithms.training import format_summary, run_recipe

    summary = run_recipe(recipe)
    if dist.get_global_rank() == 0:
        print(format_summary(summary), flush=True)
    return 0


def _list_algorithms() -> int:
    from algorithms.registry import algorithm_registry

    for name, entry in sorted(algorithm_registry().items()):
        print(f'{name:28} {entry.source:14} {entry.target}')
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == 'run':
            return _run(args)
        return _list_algorithms()
    except ConfigError as error:
        print(f'thaw: invalid recipe: {error}', file=sys.stderr)
        return EXIT_INVALID


if __name__ == '__main__':
    sys.exit(main())
