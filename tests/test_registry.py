from __future__ import annotations

import pytest

import metaopt
from metaopt.errors import ConfigError, PluginError


def test_unknown_plugin_name_suggests_the_nearest():
    with pytest.raises(PluginError) as info:
        metaopt.create_plugin("fomamll")
    assert "'fomamll'" in str(info.value) and "fomaml" in str(info.value)


def test_unknown_plugin_option_is_an_error_naming_the_option():
    with pytest.raises(ConfigError, match="weigth"):
        metaopt.create_plugin("shot", weigth=0.1)


def test_builtin_plugins_are_listed_with_descriptions():
    plugins = metaopt.list_plugins()
    for name in ("shot", "sharp_maml", "fomaml", "reptile", "convergent_fo", "hypermaml"):
        assert name in plugins and plugins[name]


def test_the_clis_plugin_spec_strings_work_in_the_library():
    """MetaLearner(plugins=["shot:weight=0.1"]) was refused while --plugin shot:weight=0.1 worked."""
    from metaopt.models import mlp

    shot = metaopt.create_plugin("shot:weight=0.25")
    assert type(shot).__name__ == "SHOT" and shot.weight == 0.25
    sharp = metaopt.create_plugin("sharp_maml:rho_inner=0.05,rho_outer=0.01")
    assert (sharp.rho_inner, sharp.rho_outer) == (0.05, 0.01)
    learner = metaopt.MetaLearner(mlp(), plugins=["shot:weight=0.1"])
    assert learner.plugins[0].weight == 0.1
    with pytest.raises(ConfigError, match=r"\['weight'\] given both"):
        metaopt.create_plugin("shot:weight=0.1", weight=0.2)
    with pytest.raises(ConfigError, match="weigth"):
        metaopt.create_plugin("shot:weigth=0.1")


def test_a_bare_string_for_plugins_is_refused_not_read_letter_by_letter():
    from metaopt.models import mlp

    with pytest.raises(ConfigError, match=r"plugins must be a list.*Did you mean plugins=\['shot'\]"):
        metaopt.MetaLearner(mlp(), "shot")
