"""Plugins by name: the built-ins plus the ``metaopt.plugins`` entry-point group.

An installed third-party plugin becomes *available* by name; it is never switched on
unless the user asks for it.  Set ``METAOPT_DISABLE_ENTRY_POINTS=1`` to ignore the group.
"""

from __future__ import annotations

import importlib
import inspect
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from metaopt.config import coerce
from metaopt.errors import ConfigError, PluginError, suggest

ENTRY_POINT_GROUP = "metaopt.plugins"
DISABLE_ENV = "METAOPT_DISABLE_ENTRY_POINTS"


@dataclass(frozen=True)
class PluginEntry:
    name: str
    factory: Callable[..., object]
    description: str
    source: str  # "builtin" or the distribution that provides it


_REGISTRY: dict[str, PluginEntry] = {}
_loaded = False


def register_plugin(
    name: str, factory: Callable[..., object], description: str = "", *, source: str = "builtin"
) -> Callable[..., object]:
    """Make ``factory`` available as ``create_plugin(name, **options)``."""
    if name in _REGISTRY and _REGISTRY[name].factory is not factory:
        raise PluginError(f"plugin name {name!r} is already registered by {_REGISTRY[name].source}.")
    desc = description or (inspect.getdoc(factory) or "").split("\n")[0]
    _REGISTRY[name] = PluginEntry(name, factory, desc, source)
    return factory


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("metaopt.plugins")  # registers the built-in algorithms
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:
            factory = ep.load()
        except Exception as exc:  # a broken third-party package must say which one
            raise PluginError(
                f"entry point {ep.name!r} ({ep.value}) in group {ENTRY_POINT_GROUP!r} failed to load: {exc}. "
                f"Fix or uninstall that package, or set {DISABLE_ENV}=1."
            ) from exc
        dist = getattr(ep, "dist", None)
        register_plugin(ep.name, factory, source=f"entry point ({dist.name if dist else ep.value})")


def list_plugins() -> dict[str, str]:
    """Available plugin names with one-line descriptions."""
    _load()
    return {name: entry.description for name, entry in sorted(_REGISTRY.items())}


def plugin_entry(name: str) -> PluginEntry:
    _load()
    if name not in _REGISTRY:
        raise PluginError(
            f"unknown plugin {name!r}.{suggest(name, _REGISTRY)} Available: {', '.join(sorted(_REGISTRY))}."
        )
    return _REGISTRY[name]


def create_plugin(name: str, **options: Any) -> object:
    """Instantiate the plugin registered as ``name`` with ``options``; unknown options are errors."""
    entry = plugin_entry(name)
    try:
        signature = inspect.signature(entry.factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None and not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        known = [n for n, p in signature.parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for key in options:
            if key not in known:
                raise ConfigError(
                    f"plugin {name!r} has no option {key!r}.{suggest(key, known)} Its options: {', '.join(known) or 'none'}."
                )
    hints = _option_hints(entry.factory)
    options = {k: coerce(k, v, hints[k], f"plugin {name!r} option") if k in hints else v for k, v in options.items()}
    try:
        return entry.factory(**options)
    except TypeError as exc:  # e.g. a value of the wrong type compared inside __init__
        raise ConfigError(f"plugin {name!r} cannot take the options {options}: {exc}") from exc


def _option_hints(factory: Callable[..., object]) -> dict[str, Any]:
    """Declared types of a plugin factory's options ({} where they cannot be resolved)."""
    target = factory.__init__ if inspect.isclass(factory) else factory  # type: ignore[misc]
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: options pass through unchanged
        return {}
