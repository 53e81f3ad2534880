"""The installed distribution declares its algorithms for llm-foundry and the thaw console script."""

from importlib.metadata import entry_points, packages_distributions

from composer_thaw.core.registry import algorithm_registry, our_algorithm_names


def test_llmfoundry_entry_points_resolve_to_our_classes():
    declared = {ep.name: ep for ep in entry_points(group='llmfoundry_algorithms')}
    assert set(declared) == set(our_algorithm_names())
    for name, entry_point in declared.items():
        assert entry_point.load() is algorithm_registry()[name].load()


def test_thaw_console_script_is_declared():
    (script,) = [ep for ep in entry_points(group='console_scripts') if ep.name == 'thaw']
    assert script.value == 'composer_thaw.cli:main'


def test_the_distribution_installs_only_the_composer_thaw_package():
    """PyPI's `algorithms` project installs a top-level `algorithms`; ours must not, or having both breaks one."""
    top_level = {name for name, dists in packages_distributions().items() if 'composer-thaw' in dists}
    assert top_level == {'composer_thaw'}
    assert 'algorithms' not in packages_distributions()
