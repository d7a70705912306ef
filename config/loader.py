"""Loading option files: ``load_config(path, overrides)`` reads a JSON option file (optionally extending a
``"base"`` file), applies dotted command-line overrides (parsed by OmegaConf) and builds the ``Config`` of
config/schema.py. Every mistake (unknown key, wrong type, impossible value) raises one ``ConfigError`` naming the
file and the key. Loading has no side effects: nothing is written and no environment variable is set.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union, get_args, get_origin, get_type_hints

from omegaconf import OmegaConf

from config.schema import BASE_KEY, Config, _FieldError
from utils.errors import ConfigError


def load_config(path: Union[str, Path], overrides: Sequence[Union[str, tuple[str, Any]]] = ()) -> Config:
    """Read an option file, apply overrides and validate.

    ``overrides`` holds ``"dotted.key=value"`` strings (values parsed by OmegaConf: numbers, true/false,
    null, lists) or ``(dotted.key, value)`` pairs whose value is taken as it is.
    """
    raw, owners = _read_with_bases(Path(path), chain=())
    return config_from_dict(raw, source=str(path), overrides=overrides, owners=owners)


def config_from_dict(raw: Mapping[str, Any], source: str, overrides: Sequence[Union[str, tuple[str, Any]]] = (),
                     owners: Optional[Mapping[str, str]] = None) -> Config:
    """Build a validated ``Config`` from a plain dict (an option file's content or a saved resolved config) and
    ``overrides`` (as ``load_config`` takes them). A message about a value names where it came from: the override
    that set it, else the file that set it (``owners``: dotted key -> file, for option files with bases), else
    ``source``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a JSON object at the top level, got {type(raw).__name__}")
    raw, origins = _apply_overrides(raw, overrides)
    return _build(Config, raw, prefix="", source=_Source(source, {**(owners or {}), **origins}))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain JSON types; ``config_from_dict`` turns it back into the same ``Config``."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


@dataclass(frozen=True)
class _Source:
    """Where the options come from: a file (or checkpoint), except the keys that base files or overrides set."""

    name: str
    origins: Mapping[str, str]  # dotted key -> the base file or the override that set it, as messages show it

    def of(self, key: str) -> str:
        """Where ``key`` (an item ``key[i]`` of a list: where the list; a section: its first key) was set."""
        for whole in (key, key.split("[", 1)[0]):
            if whole in self.origins:
                return self.origins[whole]
        return next((origin for k, origin in self.origins.items() if k.startswith(key + ".")), self.name)


def _apply_overrides(raw: Mapping[str, Any],
                     overrides: Sequence[Union[str, tuple[str, Any]]]) -> tuple[dict[str, Any], dict[str, str]]:
    """``raw`` with each dotted-key override set, and which override set which key; unknown keys raise."""
    merged, origins = json.loads(json.dumps(raw)), {}
    for item in overrides:
        if isinstance(item, str):
            key, value = _parse_override(item)
            shown = f"command-line override {item!r}"
        else:
            key, value = item
            shown = f"override {key}={value!r}"
        _check_key_path(key, shown)
        node = merged
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
        origins[key] = shown
    return merged, origins


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"command-line override {item!r}: expected dotted.key=value, e.g. train.epoch=1")
    if not text.strip():  # OmegaConf reads "key=" as null, which for some keys means something (a download)
        raise ConfigError(f"command-line override {item!r} gives no value: write {key.strip()}=null for null, or "
                          f"{key.strip()}=\"''\" for an empty string")
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
    except Exception as err:  # OmegaConf and YAML parser errors share no base class
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"command-line override {item!r}: cannot parse the value ({first_line})") from None
    for part in key.strip().split("."):
        parsed = parsed[part]
    return key.strip(), parsed


def _check_key_path(key: str, shown: str) -> None:
    cls: Any = Config
    walked = []
    for part in key.split("."):
        if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
            raise ConfigError(f"{shown}: {'.'.join(walked)} is a value, not a section")
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            where = ".".join(walked + [part])
            raise ConfigError(f"{shown}: unknown key {where}{_suggest(part, names, walked)}")
        walked.append(part)
        cls = get_type_hints(cls)[part]


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    """The option file merged over its base files, and for each dotted key the file that set it."""
    raw = _read_json(path)
    base = raw.pop(BASE_KEY, None)
    owners = dict.fromkeys(_dotted_keys(raw), str(path))
    if base is None:
        return raw, owners
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: \"{BASE_KEY}\" must name another option file (got {base!r})")
    base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
    resolved = base_path.resolve()
    if resolved in chain or resolved == path.resolve():
        raise ConfigError(f"{path}: \"{BASE_KEY}\": {base} extends itself through a cycle of base files")
    if not base_path.exists():
        raise ConfigError(f"{path}: \"{BASE_KEY}\": {base} not found (looked for {base_path}; a relative base is "
                          f"read from the folder of the file that names it)")
    parent, parent_owners = _read_with_bases(base_path, chain + (path.resolve(),))
    merged = OmegaConf.merge(OmegaConf.create(parent), OmegaConf.create(raw))
    return OmegaConf.to_container(merged, resolve=False), {**parent_owners, **owners}


def _dotted_keys(raw: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in raw.items():
        keys += _dotted_keys(value, f"{prefix}{key}.") if isinstance(value, Mapping) else [f"{prefix}{key}"]
    return keys


def _read_json(path: Path) -> dict[str, Any]:
    """An option file's JSON object; ``path`` may also be a pipe (``--opt <(...)``) or a device such as /dev/stdin."""
    if path.is_dir():
        raise ConfigError(f"option file {path} is a folder; pass a JSON file with --opt")
    if not path.exists():
        raise ConfigError(f"option file {path} not found (pass an existing JSON file with --opt)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"option file {path}: cannot read it ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _suggest(name: str, choices: Mapping[str, Any], walked: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {'.'.join([*walked, close[0]])}?)"
    return f" (known keys: {', '.join(choices)})"


def _build(cls: type, raw: Mapping[str, Any], prefix: str, source: _Source) -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    walked = prefix.rstrip(".").split(".") if prefix else []
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{source.of(prefix + key)}: unknown key {prefix}{key}{_suggest(key, fields, walked)}")
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _convert(raw[name], hints[name], f"{prefix}{name}", source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source.name}: missing key {prefix}{name}")
    try:
        return cls(**values)
    except _FieldError as err:
        raise ConfigError(f"{source.of(prefix + err.key)}: {prefix}{err.key} {err.problem}") from None


def _convert(value: Any, tp: Any, key: str, source: _Source) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source.of(key)}: {key} must be a JSON object (got {_shown(value)})")
        return _build(tp, value, f"{key}.", source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source.of(key)}: {key} must be a list (got {_shown(value)})")
        return tuple(_convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source.of(key)}: {key} must be true or false (got {_shown(value)})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{source.of(key)}: {key} must be an integer (got {_shown(value)})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 or isinstance(value, float) else math.inf
            if math.isfinite(number):
                return number
        raise ConfigError(f"{source.of(key)}: {key} must be a finite number (got {_shown(value)})")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source.of(key)}: {key} must be a string (got {_shown(value)})")
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    shown = json.dumps(value) if isinstance(value, (str, list, dict)) else repr(value)
    return f"{type(value).__name__} {shown}"
