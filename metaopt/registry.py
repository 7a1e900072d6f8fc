"""Plugins by name: the built-ins plus the ``metaopt.plugins`` entry-point group.

An installed third-party plugin becomes *available* by name; it is never switched on
unless the user asks for it.  Entry points are read from the installed distributions'
metadata and imported one at a time, when their name is asked for (or listed): one broken
distribution breaks only its own name.  A name provided twice (a third-party ``anil`` beside the
built-in one, or two distributions) is never resolved silently: asking for it is an error that
names both providers, and ``PROVIDER/name`` (``builtin/anil``, ``my-dist/anil``) picks one.
Set ``METAOPT_DISABLE_ENTRY_POINTS=1`` to ignore the group.
"""

from __future__ import annotations

import importlib
import inspect
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from metaopt.config import coerce
from metaopt.errors import ConfigError, PluginError, suggest

ENTRY_POINT_GROUP = "metaopt.plugins"
DISABLE_ENV = "METAOPT_DISABLE_ENTRY_POINTS"
BUILTIN = "builtin"


@dataclass(frozen=True)
class PluginEntry:
    name: str
    factory: Callable[..., object]
    description: str
    source: str  # "builtin" or the distribution that provides it


_REGISTRY: dict[str, PluginEntry] = {}
_builtins_loaded = False
_discovered: dict[str, list[EntryPoint]] | None = None
_loaded_entry_points: dict[tuple[str, str], PluginEntry] = {}


def register_plugin(
    name: str, factory: Callable[..., object], description: str = "", *, source: str = BUILTIN
) -> Callable[..., object]:
    """Make ``factory`` available as ``create_plugin(name, **options)``."""
    if "/" in name or ":" in name:
        raise PluginError(f"plugin name {name!r} may not contain '/' or ':' (they qualify names and start options).")
    if name in _REGISTRY and _REGISTRY[name].factory is not factory:
        raise PluginError(f"plugin name {name!r} is already registered by {_REGISTRY[name].source}.")
    desc = description or (inspect.getdoc(factory) or "").split("\n")[0]
    _REGISTRY[name] = PluginEntry(name, factory, desc, source)
    return factory


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("metaopt.plugins")  # registers the built-in algorithms


def distribution(ep: EntryPoint) -> str:
    """The name of the distribution that declares ``ep`` (its ``module:attr`` where unknown)."""
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else ep.value


def _entry_points() -> dict[str, list[EntryPoint]]:
    """The group's entry points by name, read from metadata only (nothing imported)."""
    global _discovered
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return {}
    if _discovered is None:
        found: dict[str, list[EntryPoint]] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if all(distribution(ep) != distribution(other) for other in found.get(ep.name, [])):
                found.setdefault(ep.name, []).append(ep)
        _discovered = found
    return _discovered


def _load_entry_point(ep: EntryPoint) -> PluginEntry:
    key = (ep.name, distribution(ep))
    if key not in _loaded_entry_points:
        try:
            factory = ep.load()
        except Exception as exc:  # a broken third-party package says which one, and only when asked for
            raise PluginError(
                f"plugin {ep.name!r} from distribution {distribution(ep)!r} ({ep.value}, entry-point group "
                f"{ENTRY_POINT_GROUP!r}) failed to load: {type(exc).__name__}: {exc}. Fix or uninstall that "
                f"package, or set {DISABLE_ENV}=1."
            ) from exc
        desc = (inspect.getdoc(factory) or "").split("\n")[0]
        _loaded_entry_points[key] = PluginEntry(ep.name, factory, desc, f"entry point ({distribution(ep)})")
    return _loaded_entry_points[key]


def providers(name: str) -> list[str]:
    """Who provides plugin ``name``: ``"builtin"`` (or a registering source) and distribution names."""
    _load_builtins()
    found = [_REGISTRY[name].source] if name in _REGISTRY else []
    return found + [distribution(ep) for ep in _entry_points().get(name, [])]


def plugin_entry(name: str) -> PluginEntry:
    """The plugin registered as ``name`` or ``PROVIDER/name``; a name with two providers is an error."""
    _load_builtins()
    if "/" in name:
        source, _, base = name.partition("/")
        if base in _REGISTRY and _REGISTRY[base].source == source:
            return _REGISTRY[base]
        for ep in _entry_points().get(base, []):
            if distribution(ep) == source:
                return _load_entry_point(ep)
        raise PluginError(f"no plugin {base!r} from {source!r}; {base!r} is provided by {providers(base) or 'nobody'}.")
    sources = providers(name)
    if len(sources) > 1:
        raise PluginError(
            f"plugin name {name!r} is provided by {' and by '.join(repr(s) for s in sources)}; metaopt does not "
            f"choose silently. Ask for one: {', '.join(repr(f'{s}/{name}') for s in sources)} (or uninstall one)."
        )
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _entry_points():
        return _load_entry_point(_entry_points()[name][0])
    known = sorted({*_REGISTRY, *_entry_points()})
    raise PluginError(f"unknown plugin {name!r}.{suggest(name, known)} Available: {', '.join(known)}.")


def list_plugins() -> dict[str, str]:
    """Available plugin names with one-line descriptions.

    A name with two providers is listed once per provider, as ``PROVIDER/name``; an entry point
    that fails to import is listed with ``BROKEN:`` and its error (nothing else is affected).
    """
    _load_builtins()
    listed = {}
    for name in sorted({*_REGISTRY, *_entry_points()}):
        qualified = len(providers(name)) > 1
        if name in _REGISTRY:
            entry = _REGISTRY[name]
            listed[f"{entry.source}/{name}" if qualified else name] = entry.description
        for ep in _entry_points().get(name, []):
            key = f"{distribution(ep)}/{name}" if qualified else name
            try:
                listed[key] = _load_entry_point(ep).description
            except PluginError as exc:
                listed[key] = f"BROKEN: {exc}"
    return listed


def create_plugin(name: str, **options: Any) -> object:
    """Instantiate the plugin registered as ``name`` with ``options``; unknown options are errors.

    ``name`` may also be the CLI's spec string, ``"shot:weight=0.1"`` (values read as YAML
    scalars, as ``--plugin`` reads them); an option given both ways is an error.
    """
    if not isinstance(name, str):
        raise ConfigError(f"a plugin name must be a string; got {type(name).__name__} {name!r}.")
    if ":" in name:
        from metaopt.config import parse_plugin_arg

        spec = parse_plugin_arg(name)
        twice = sorted(set(spec) - {"name"} & set(options))
        if twice:
            raise ConfigError(
                f"plugin option(s) {twice} given both in {name!r} and as keyword arguments; give each once."
            )
        name, options = spec.pop("name"), {**spec, **options}
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
