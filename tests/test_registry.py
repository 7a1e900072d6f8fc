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
