"""Hybrid sharding (HSDP) set-up: ``HSDPConfig`` and a recipe's ``parallelism.fsdp`` degrees, checked before any
process starts. Training under HSDP is the conformance suite's (tests/conformance/test_hsdp.py, 4 processes)."""

import warnings

import pytest
import torch
from composer.utils.parallelism import FSDP2Config

from composer_thaw.core.validation import ConfigError
from composer_thaw.recipes.building import build_parallelism
from composer_thaw.recipes.schema import check_processes, recipe_from_mapping
from composer_thaw.utils.hybrid_sharding import HSDPConfig, record_cpu_stream_events

pytestmark = pytest.mark.filterwarnings('ignore:FSDP2 Config/APIs are experimental')


def test_hsdp_config_gives_composer_the_degrees_it_builds_a_2d_mesh_from():
    config = HSDPConfig(data_parallel_replicate_degree=2, state_dict_type='full')
    assert isinstance(config, FSDP2Config)
    assert (config.data_parallel_replicate_degree, config.data_parallel_shard_degree) == (2, -1)
    assert config.state_dict_type == 'full'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        plain = FSDP2Config()
    assert (plain.data_parallel_replicate_degree, plain.data_parallel_shard_degree) == (None, -1)  # untouched


@pytest.mark.parametrize(
    ('kwargs', 'fragment'),
    [
        ({'data_parallel_replicate_degree': 0}, 'data_parallel_replicate_degree=0: expected a positive'),
        ({'data_parallel_replicate_degree': 1.5}, 'data_parallel_replicate_degree=1.5'),
        ({'data_parallel_shard_degree': 0}, 'data_parallel_shard_degree=0: expected a positive number'),
        ({'data_parallel_shard_degree': -2}, 'or -1 for the world size divided by the replicas'),
    ],
)
def test_bad_hsdp_degrees_are_refused_naming_the_value(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace('.', r'\.')):
        HSDPConfig(**kwargs)


def test_a_cpu_stream_records_a_complete_event():
    """FSDP2's HSDP backward asserts its all-reduce stream recorded an event; torch's CPU stub recorded None."""
    record_cpu_stream_events()
    record_cpu_stream_events()  # idempotent
    event = torch.cpu.Stream().record_event()
    assert isinstance(event, torch.cpu.Event) and event.query()


def _recipe(**fsdp):
    return recipe_from_mapping({'parallelism': {'fsdp': fsdp}, 'global_train_batch_size': 24})


def test_a_recipe_with_replicas_builds_hsdp_and_without_them_plain_fsdp2():
    hybrid = build_parallelism(_recipe(data_parallel_replicate_degree=2).parallelism)
    assert isinstance(hybrid['fsdp'], HSDPConfig) and hybrid['fsdp'].data_parallel_replicate_degree == 2
    plain = build_parallelism(_recipe(state_dict_type='full').parallelism)
    assert type(plain['fsdp']) is FSDP2Config and plain['fsdp'].state_dict_type == 'full'


@pytest.mark.parametrize(
    ('fsdp', 'fragment'),
    [
        ({'data_parallel_replicate_degree': 0}, 'parallelism.fsdp.data_parallel_replicate_degree'),
        ({'data_parallel_shard_degree': 2}, 'set data_parallel_replicate_degree too'),
        ({'data_parallel_replicate_degree': 2, 'data_parallel_shard_degree': 0}, 'or -1 for the processes'),
    ],
)
def test_bad_recipe_degrees_are_one_config_error(fsdp, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _recipe(**fsdp)


@pytest.mark.parametrize(
    ('fsdp', 'processes', 'fragment'),
    [
        ({'data_parallel_replicate_degree': 3}, 4, 'must divide the number of processes (--nproc 4)'),
        ({'data_parallel_replicate_degree': 2, 'data_parallel_shard_degree': 4}, 4, 'must equal the number'),
    ],
)
def test_hsdp_degrees_that_do_not_fit_the_processes_are_refused_before_launching(fsdp, processes, fragment):
    with pytest.raises(ConfigError, match=fragment.replace('(', r'\(').replace(')', r'\)')):
        check_processes(_recipe(**fsdp), processes, f'--nproc {processes}')
    check_processes(_recipe(**fsdp), 8 if 'data_parallel_shard_degree' in fsdp else 6, 'fits')
