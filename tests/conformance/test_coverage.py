"""The suite covers every registered algorithm automatically: a third-party algorithm declared under the
``composer_thaw.algorithms`` entry point, with EXAMPLES next to its class, gets the same generated checks as ours."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from conformance.harness import covered_names, examples_of

SUITE = Path(__file__).parent

PLUGIN = """
from composer.core import Algorithm, Event

EXAMPLES = ({}, {'scale': 2.0})


class ThirdPartyNoOp(Algorithm):
    events = (Event.INIT,)

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def match(self, event, state):
        return event in self.events

    def apply(self, event, state, logger):
        pass
"""


def _collect(extra_path: Path) -> list[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(extra_path), env_path()]))
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', '--collect-only', '-q', '-p', 'no:cacheprovider', str(SUITE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if '::' in line]


def env_path() -> str:
    return os.environ.get('PYTHONPATH', '')


def _install_plugin(root: Path) -> None:
    (root / 'thaw_plugin_example.py').write_text(textwrap.dedent(PLUGIN))
    info = root / 'thaw_plugin_example-0.1.dist-info'
    info.mkdir()
    (info / 'METADATA').write_text('Metadata-Version: 2.1\nName: thaw-plugin-example\nVersion: 0.1\n')
    (info / 'entry_points.txt').write_text(
        '[composer_thaw.algorithms]\nthird_party_noop = thaw_plugin_example:ThirdPartyNoOp\n'
    )


def _functions(test_ids: list[str], algorithm: str, example: int | None = None) -> set[str]:
    """The test functions generated for ``algorithm`` (for its example ``example`` if given)."""
    marker = f'{algorithm}[{example}]' if example is not None else algorithm
    return {
        test_id.split('::')[1].split('[')[0]
        for test_id in test_ids
        if re.search(r'[\[.+:]' + re.escape(marker), test_id.split('::')[1])
    }


N_A_TO_A_PLUGIN_WITHOUT_ANNOTATED_CHOICES = {
    'test_surgery_is_idempotent_and_changes_the_model',  # only for required_on_load algorithms
    'test_unknown_choice_lists_the_valid_ones',  # only for Literal arguments
    'test_bad_configuration_fails_before_training_and_leaves_model_untouched',  # only with BAD_EXAMPLES
    'test_sharded_checkpoints_hold_state_only_for_what_trained',  # only LayerFreezing and HiFTRotation
    'test_trains_in_bf16_with_masters_and_resumes_bit_identical',  # only algorithms with a master_weights option
    'test_weights_equal_a_reference_that_keeps_every_master',  # the same
    'test_bf16_weights_with_sharded_fp32_masters_train_and_resume_exactly',  # the same, under FSDP2
    'test_hsdp_bf16_weights_with_fp32_masters_train_and_resume_exactly',  # the same, under HSDP
    'test_fp32_masters_resume_at_another_world_size',  # the same, resumed at another world size
}


def test_a_registered_third_party_algorithm_gets_every_generated_check(tmp_path):
    _install_plugin(tmp_path)
    test_ids = _collect(tmp_path)
    ours = [name for name in covered_names() if len(examples_of(name)) >= 2]
    assert ours, 'no algorithm of ours with two examples to compare with'
    for name in covered_names():
        assert _functions(test_ids, name), f'{name} is not covered'
    reference = _functions(test_ids, ours[0])
    plugin = _functions(test_ids, 'third_party_noop')
    assert plugin >= reference - N_A_TO_A_PLUGIN_WITHOUT_ANNOTATED_CHOICES
    # the checks run per example run for the plugin's last example too
    last = len(examples_of(ours[0])) - 1
    assert _functions(test_ids, 'third_party_noop', 1) == _functions(test_ids, ours[0], last) - (
        N_A_TO_A_PLUGIN_WITHOUT_ANNOTATED_CHOICES
    )
    assert len([t for t in test_ids if 'third_party_noop' in t]) >= 20
