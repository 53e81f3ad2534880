"""The installed distribution declares its algorithms for llm-foundry and the thaw console script."""

from importlib.metadata import entry_points

from algorithms.registry import algorithm_registry, our_algorithm_names


def test_llmfoundry_entry_points_resolve_to_our_classes():
    declared = {ep.name: ep for ep in entry_points(group='llmfoundry_algorithms')}
    assert set(declared) == set(our_algorithm_names())
    for name, entry_point in declared.items():
        assert entry_point.load() is algorithm_registry()[name].load()


def test_thaw_console_script_is_declared():
    (script,) = [ep for ep in entry_points(group='console_scripts') if ep.name == 'thaw']
    assert script.value == 'algorithms.cli:main'
