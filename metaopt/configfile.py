"""Reading config files and plugin options: UTF-8 only, YAML without alias bombs or duplicate keys.

A YAML document may expand a handful of aliases into billions of nodes (the "billion laughs");
``safe_load`` does not bound that, and ``metaopt train --config`` hung for minutes on one.  Here a
document with more than :data:`MAX_ALIASES` aliases, or whose aliases expand to more than
:data:`MAX_NODES` values, is refused before it is built, and a mapping that repeats a key is an
error naming the key and its line (the last value no longer wins silently).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from metaopt.errors import ConfigError

MAX_ALIASES = 100
#: the most values a document may hold once its aliases are expanded
MAX_NODES = 100_000


def _expanded_size(node: yaml.Node | None, memo: dict[int, int]) -> int:
    """How many values ``node`` holds with every alias expanded (shared nodes counted once each time
    they are used; computed once per node, so the count itself never expands anything)."""
    if node is None:
        return 0
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once
    if isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_size(item, memo) for item in node.value)
    else:
        total = 1
    memo[id(node)] = total
    return total


class _StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                continue  # unhashable: SafeLoader's own error names it
            if key in seen:
                raise ConfigError(
                    f"key {key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); keep one."
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def load_yaml(text: str, where: str) -> Any:
    """A YAML document (safe tags only) with at most :data:`MAX_ALIASES` aliases and no repeated keys."""
    try:
        aliases = sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader))
        if aliases > MAX_ALIASES:
            raise ConfigError(
                f"{where} uses {aliases} YAML aliases (more than {MAX_ALIASES}); an alias expansion this large is "
                "refused (it can grow without bound). Write the values out."
            )
        if aliases:
            size = _expanded_size(yaml.compose(text, Loader=yaml.SafeLoader), {})
            if size > MAX_NODES:
                raise ConfigError(
                    f"{where} expands its YAML aliases to {size} values (more than {MAX_NODES}); refused, as a "
                    "'billion laughs' document would be. Write the values out."
                )
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{where} is nested too deeply to read.") from exc


def read_text(path: Path, what: str) -> str:
    """A file's text, which must be UTF-8 (the error names the file and the byte)."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError as exc:
        raise ConfigError(f"{what} {str(path)!r} is a folder, not a file.") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}.") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        hint = " (it looks like UTF-16; save it as UTF-8)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text: {exc.reason} at byte {exc.start}{hint}.") from exc


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ConfigError(f"JSON key(s) {repeated} given twice in one object; keep one.")
    return dict(pairs)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A config file (``.json``, else YAML) as a mapping of settings."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    text = read_text(path, "config file")
    where = f"config file {str(path)!r}"
    if path.suffix == ".json":
        try:
            values = json.loads(text, object_pairs_hook=_unique_pairs)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where} is not valid JSON: {exc}") from exc
        except RecursionError as exc:
            raise ConfigError(f"{where} is nested too deeply to read.") from exc
    else:
        values = load_yaml(text, where)
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must hold a mapping of settings; got {type(values).__name__}.")
    return values
