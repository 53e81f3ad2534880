"""The ``thaw`` command.

    thaw run yamls/demo.yaml [--set optimizer.lr=1e-4 ...] [--nproc N]
    thaw run yamls/demo.yaml --nproc 2 --nnodes 2 --node-rank 0 --master-addr node0 --master-port 29500  # per node
    thaw freeze-preview yamls/regex_freeze.yaml          # what the recipe's regex_freeze would train
    thaw freeze-preview minilm --pattern classifier --pattern 'bert.encoder.layer.5'
    thaw hift-preview yamls/hift_minilm.yaml              # HiFT's units and the order it trains them in
    thaw algorithms                      # list registered algorithm names
    thaw estimate --model-config llama-7b --algorithm full --algorithm 'lora_inject={r: 16}'
    thaw estimate --model-config yamls/files_classification.yaml   # the model that recipe's run builds

Invalid recipes exit with code 2 and one paragraph naming the key, the bad value and what is valid.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from composer_thaw.core.validation import ConfigError
from composer_thaw.recipes import launching
from composer_thaw.recipes.launching import NodeLayout, StopReport, node_layout

__all__ = ['main']

EXIT_INVALID = 2
EXIT_INTERRUPTED = 130  # as a shell reports a process ended by SIGINT
EXIT_DIVERGED = 3  # the loss became nan or inf (composer_thaw.callbacks.loss_guard)


def _parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog='thaw', description='Run composer-thaw recipes.')
    parser.add_argument('--version', action='version', version=f'thaw (composer-thaw) {version("composer-thaw")}')
    commands = parser.add_subparsers(dest='command', required=True)
    run = commands.add_parser('run', help='train from a YAML recipe')
    run.add_argument('recipe', help='path to a YAML recipe, e.g. yamls/demo.yaml')
    run.add_argument(
        '--set',
        dest='overrides',
        action='append',
        default=[],
        metavar='KEY=VALUE',
        help='override a recipe value (dotted path; value parsed as YAML); repeatable',
    )
    nodes = run.add_argument_group(
        'processes and machines',
        "Composer's launcher starts the processes (gloo on CPU, NCCL on GPUs). On several machines run the same "
        'command on each, with its own --node-rank. An option left out is read from the environment variable '
        "Composer's launcher reads (in brackets), so a scheduler such as SLURM can set them.",
    )
    # whole numbers are checked by composer_thaw.recipes.launching.node_layout: a bad one is a one-line error
    for flag, metavar, text in (
        ('--nproc', 'N', 'processes on this node (LOCAL_WORLD_SIZE; default 1)'),
        ('--nnodes', 'N', 'nodes (machines) in the run (default 1)'),
        ('--world-size', 'N', 'processes on all nodes, instead of --nnodes: nnodes x nproc (WORLD_SIZE)'),
        ('--node-rank', 'R', 'this node, 0 to nnodes - 1 (NODE_RANK, or BASE_RANK / nproc; default 0)'),
        ('--master-addr', 'HOST', 'host name or address of node 0, the same on every node (MASTER_ADDR)'),
        ('--master-port', 'PORT', 'a free TCP port on node 0, the same on every node (MASTER_PORT)'),
    ):
        nodes.add_argument(flag, default=None, metavar=metavar, help=text)
    preview = commands.add_parser('freeze-preview', help='show what RegexFreeze patterns would train')
    preview.add_argument(
        'source', help="a recipe (.yaml), 'minilm', 'tiny-decoder', or a local Hugging Face checkpoint"
    )
    preview.add_argument(
        '--pattern',
        dest='trainable',
        action='append',
        default=None,
        metavar='PATTERN',
        help="a trainable pattern (repeatable); default: the recipe's regex_freeze.trainable",
    )
    preview.add_argument('--frozen', action='append', default=None, metavar='PATTERN', help='a frozen pattern')
    preview.add_argument('--syntax', choices=['axolotl', 'regex'], default=None)
    hift = commands.add_parser('hift-preview', help="show HiFTRotation's units and the order it trains them in")
    hift.add_argument('source', help="a recipe (.yaml), 'minilm', 'tiny-decoder', or a local Hugging Face checkpoint")
    hift.add_argument('--group-size', type=int, default=None, help='units per group')
    hift.add_argument('--strategy', choices=['down2up', 'up2down', 'random'], default=None)
    hift.add_argument('--freeze', type=int, action='append', default=None, metavar='INDEX', help='a unit never trained')
    hift.add_argument(
        '--always-trainable',
        action='append',
        default=None,
        metavar='REGEX',
        help='units (by name) trained at every step',
    )
    hift.add_argument('--groups', action='append', default=None, metavar='REGEX', help='explicit units (regexes)')
    commands.add_parser('algorithms', help='list the algorithm names a recipe can use')
    estimate = commands.add_parser('estimate', help='predict training-state bytes for a model size and algorithms')
    estimate.add_argument(
        '--model-config',
        required=True,
        help="a config.json (or its folder), a recipe (.yaml: the model its run builds), 'minilm', 'tiny-decoder', "
        "'gpt2', 'llama-7b', ...",
    )
    estimate.add_argument(
        '--algorithm',
        action='append',
        default=[],
        metavar='NAME[={OPTIONS}]',
        help="e.g. full, 'lora_inject={r: 16}', 'hift_rotation={group_size: 4}'; repeatable",
    )
    estimate.add_argument(
        '--set',
        dest='overrides',
        action='append',
        default=[],
        metavar='KEY=VALUE',
        help='change a config value, e.g. num_hidden_layers=8; repeatable',
    )
    estimate.add_argument('--optimizer', default='adamw', help='adamw (default), adam, sgd or adagrad')
    estimate.add_argument('--dtype', default='float32', help='float32 (default), bfloat16 or float16')
    estimate.add_argument(
        '--world-size',
        type=int,
        default=1,
        metavar='N',
        help='processes the model is sharded over with FSDP2 (default 1: unsharded, or DDP)',
    )
    return parser


def _layout(args: argparse.Namespace) -> NodeLayout:
    """This node's processes from ``thaw run``'s options and the launcher's environment variables, checked."""
    return node_layout(
        nproc=args.nproc,
        nnodes=args.nnodes,
        world_size=args.world_size,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        environ=os.environ,
    )


def _launch(args: argparse.Namespace, recipe: Any, layout: NodeLayout) -> int:
    """Start this node's ranks of ``layout`` under Composer's launcher, each running ``thaw run`` with the same recipe
    and overrides, and wait for them. If they stopped on an interruption, say what was saved and print the commands
    that resume, last (after every rank and the launcher have exited)."""
    run_arguments = ['run', args.recipe, *[a for o in args.overrides for a in ('--set', o)]]
    passed: list[int] = []
    with tempfile.TemporaryDirectory(prefix='thaw-run-') as reports:
        env = dict(os.environ)
        env.setdefault('OMP_NUM_THREADS', '1')
        env[launching.STOP_REPORTS] = reports  # where each rank says it stopped on an interruption
        code = launching.run_launcher(launching.launcher_command(layout, run_arguments), env, passed)
        report = launching.read_stop_report(reports)
    if report is not None or (passed and code != 0):
        stopped = report or StopReport()  # none: the ranks stopped before they could report (a second signal)
        print(f'thaw run: {_what_stopped(stopped)} {_how_to_resume(recipe, args, layout)}', file=sys.stderr, flush=True)
    return code


def _run(args: argparse.Namespace) -> int:
    # deferred: each command loads only what it needs
    from composer_thaw.recipes.schema import check_processes, load_recipe

    rank = launching.launched_rank(os.environ)  # one process of a launch: it trains, whatever the options say
    layout = launching.rank_layout(os.environ) if rank else _layout(args)
    recipe = load_recipe(args.recipe, args.overrides)  # validates everything before any model is built
    if not rank:
        check_processes(recipe, layout.world_size, layout.described)
        if layout.world_size > 1:
            return _launch(args, recipe, layout)

    # deferred: Composer, once the recipe is valid
    from composer.utils import dist

    from composer_thaw.callbacks.loss_guard import NonFiniteLossError
    from composer_thaw.recipes.running import format_summary, run_recipe

    try:
        summary = run_recipe(recipe)
    except NonFiniteLossError as error:
        print(f'thaw run: training stopped: {error}', file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except KeyboardInterrupt as interruption:  # Ctrl-C, or SIGINT/SIGTERM stopping at a batch's end (after a save)
        # a TrainingInterrupted (composer_thaw.callbacks.interruption) has the signal, batch and checkpoint
        number = getattr(interruption, 'signal_number', None)
        reports = os.environ.get(launching.STOP_REPORTS)
        if reports:  # started by `thaw run`, which prints the message once every rank has exited
            stopped = StopReport(
                number, getattr(interruption, 'batch', None), getattr(interruption, 'checkpoint', None)
            )
            launching.write_stop_report(reports, dist.get_global_rank(), stopped)
        elif dist.get_global_rank() == 0:  # every rank stopped at the same batch
            message = f'thaw run: {_what_stopped(interruption)} {_how_to_resume(recipe, args, layout)}'
            print(message, file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED if number is None else 128 + number  # as a shell reports the signal
    if dist.get_global_rank() == 0:
        print(format_summary(summary), flush=True)
    return 0


def _what_stopped(interruption: object) -> str:
    """What stopped the run: a :class:`~composer_thaw.callbacks.interruption.TrainingInterrupted`, a
    :class:`~composer_thaw.recipes.launching.StopReport` or a plain ``KeyboardInterrupt``."""
    number = getattr(interruption, 'signal_number', None)
    if number is None:
        return 'interrupted.'
    checkpoint = getattr(interruption, 'checkpoint', None)
    saved = f'; saved {checkpoint}' if checkpoint else ''
    return f'interrupted by {signal.Signals(number).name} after batch {getattr(interruption, "batch", "?")}{saved}.'


def _how_to_resume(recipe: Any, args: argparse.Namespace, layout: NodeLayout) -> str:
    """One sentence on picking up an interrupted run from what it saved, with the command that does it on
    ``layout``: one line, or on several nodes one line per node (each with its ``--node-rank``), last."""
    if recipe.save_folder is None:
        return 'Nothing was saved (the recipe has no save_folder); set save_folder to be able to resume a run.'
    if not (Path(recipe.save_folder) / 'latest-rank0.pt').exists():
        return f'No checkpoint was written to {recipe.save_folder!r} yet; a new run starts from the beginning.'
    resuming = ('autoresume', 'load_path', 'load_weights_only')
    kept = [o for o in args.overrides if o.partition('=')[0].strip() not in resuming]
    if recipe.run_name is not None:
        added = ['autoresume=true']
    else:
        added = [f'load_path={Path(recipe.save_folder) / "latest-rank0.pt"}', 'load_weights_only=false']
    command = ['thaw', 'run', args.recipe, *[a for o in [*kept, *added] for a in ('--set', o)]]
    lines = launching.resume_commands(command, layout)
    where = f'Checkpoints so far are in {recipe.save_folder!r}; continue from the latest one with'
    if len(lines) == 1:
        return f'{where}: {lines[0]}'
    nodes = f'these {len(lines)} commands, each on its node (this is node {layout.node_rank})'
    return f'{where} {nodes}:\n' + '\n'.join(lines)


def _model_and_recipe_options(source: str, algorithm: str) -> tuple[Any, dict[str, Any]]:
    """The model a preview is about and the recipe's options for ``algorithm`` (empty unless ``source`` is a recipe).

    A recipe's model is built as ``thaw run`` builds it (its data read first, for the classes), with the same
    checks; a name or folder alone gives the model :func:`~composer_thaw.recipes.building.build_named_model` builds.
    """
    # deferred: Composer and transformers, for previews only
    from composer.utils import reproducibility

    from composer_thaw.recipes.building import build_named_model, build_recipe_model
    from composer_thaw.recipes.schema import load_recipe

    if _is_recipe(source):
        recipe = load_recipe(source)
        reproducibility.seed_all(recipe.seed)
        return build_recipe_model(recipe).model, dict(recipe.algorithms.get(algorithm) or {})
    if source in ('minilm', 'tiny-decoder') or (Path(source) / 'config.json').is_file():
        return build_named_model(source), {}
    raise ConfigError(
        'source',
        source,
        "expected a recipe (.yaml), 'minilm', 'tiny-decoder', or a directory with a Hugging Face config.json.",
    )


def _is_recipe(source: str) -> bool:
    return source.endswith(('.yaml', '.yml'))


def _option_key(args: argparse.Namespace, algorithm: str, cli_keys: Sequence[str], cli_name: str) -> str:
    """The key an option error names: the recipe's ``algorithms.<name>`` (as ``thaw run`` does), or the CLI flag."""
    if _is_recipe(args.source) and all(getattr(args, key) is None for key in cli_keys):
        return f'algorithms.{algorithm}'
    return cli_name


def _override(options: dict[str, Any], args: argparse.Namespace, keys: Sequence[str]) -> dict[str, Any]:
    return {**options, **{key: getattr(args, key) for key in keys if getattr(args, key) is not None}}


def _preview(args: argparse.Namespace) -> int:
    """Print what RegexFreeze would train on a recipe's model (with its regex_freeze options) or a named model."""
    # deferred: one algorithm, for its preview only
    from composer_thaw.regex_freeze import freeze_preview

    model, options = _model_and_recipe_options(args.source, 'regex_freeze')
    options = _override(options, args, ('trainable', 'frozen', 'syntax'))
    try:
        print(freeze_preview(model, options.get('trainable'), options.get('frozen'), options.get('syntax', 'axolotl')))
    except ValueError as error:
        keys = ('trainable', 'frozen', 'syntax')
        key = _option_key(args, 'regex_freeze', keys, '--pattern')
        raise ConfigError(
            key, options if key.startswith('algorithms') else options.get('trainable'), str(error)
        ) from error
    return 0


def _hift_preview(args: argparse.Namespace) -> int:
    """Print HiFTRotation's units and the groups its first passes visit (with the recipe's hift_rotation options)."""
    # deferred: one algorithm, for its preview only
    from composer_thaw.hift_rotation import rotation_preview

    model, options = _model_and_recipe_options(args.source, 'hift_rotation')
    keys = ('group_size', 'strategy', 'freeze', 'always_trainable', 'groups')
    options = _override(options, args, keys)
    try:
        print(rotation_preview(model, **{key: options[key] for key in keys if key in options}))
    except (TypeError, ValueError) as error:
        raise ConfigError(_option_key(args, 'hift_rotation', keys, 'hift_rotation'), options, str(error)) from error
    return 0


def _list_algorithms(args: argparse.Namespace) -> int:
    # deferred: Composer and the entry points, for the list only
    from composer_thaw.core.registry import algorithm_registry

    for name, entry in sorted(algorithm_registry().items()):
        print(f'{name:28} {entry.source:14} {entry.target}')
    return 0


def _estimate(args: argparse.Namespace) -> int:
    # deferred: the algorithms and transformers, for estimates only
    from composer_thaw.recipes.memory_estimate import estimate_report

    print(
        estimate_report(args.model_config, args.algorithm, args.overrides, args.optimizer, args.dtype, args.world_size)
    )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    commands = {
        'run': _run,
        'freeze-preview': _preview,
        'hift-preview': _hift_preview,
        'estimate': _estimate,
        'algorithms': _list_algorithms,
    }
    try:
        return commands[args.command](args)
    except ConfigError as error:
        source = getattr(args, 'recipe', None) or getattr(args, 'source', None) or getattr(args, 'model_config', '')
        what = 'recipe' if args.command == 'run' or _is_recipe(str(source)) else 'input'
        if args.command == 'run' and (error.key.startswith('--') or error.key.split(' ')[0].isupper()):
            what = 'option'  # how many processes and where (an option, or the launcher's environment variable)
        one_line = ' '.join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f'thaw {args.command}: invalid {what}: {one_line}', file=sys.stderr)
        return EXIT_INVALID


if __name__ == '__main__':
    sys.exit(main())
