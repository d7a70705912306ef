"""Sweeps on the command line in Hydra's override grammar, read by hydra-core's own parser.

``run.py --multirun seed=0,1,2 training_coeff.initialcrit_pos=0.5,0.55`` runs every combination of the values.
Hydra's grammar: comma lists (``a=1,2``), ``choice(1,2)``, ``range(0,5)`` / ``range(0,1,0.25)``, ``sort(...)``,
quoting for a value that holds a comma or a space (``wandb.notes='a, b'``), lists in brackets (``wandb.tags=[x,y]``).
Hydra's ``+key``/``~key`` (add or delete a key) and ``interval()`` / ``glob()`` (for optimisers and config groups)
have no meaning for an option file whose keys are fixed, and are refused.

Each run passes its values to the program as ``key=<JSON>``, which the single-run parser (OmegaConf) reads back as
the same value, whatever it is (a string that looks like a number stays a string).
"""
from __future__ import annotations

import itertools
import json
from typing import Any, NamedTuple, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType, QuotedString, ValueType
from hydra.errors import HydraException

from utils.errors import ConfigError

NAME_MAX = 200  # characters of a run's folder name (file systems allow 255 bytes)
SWEEPS = (ValueType.SIMPLE_CHOICE_SWEEP, ValueType.CHOICE_SWEEP, ValueType.RANGE_SWEEP)


class Setting(NamedTuple):
    """One key set to one value; ``text`` is how folder names and messages show the value."""

    key: str
    value: Any
    text: str

    @property
    def override(self) -> str:
        """The single-run override that sets this value exactly."""
        return f"{self.key}={json.dumps(self.value)}"


class Sweep(NamedTuple):
    fixed: tuple[Setting, ...]  # the same in every run
    axes: tuple[tuple[Setting, ...], ...]  # one tuple of settings per swept key, in command-line order

    def points(self) -> list[tuple[Setting, ...]]:
        """Every combination of the swept values, the last key varying fastest (Hydra's order)."""
        return list(itertools.product(*self.axes))


def parse_sweep(items: Sequence[str]) -> Sweep:
    """The command line's overrides under ``--multirun``: fixed settings and swept ones."""
    parser = OverridesParser.create()
    fixed, axes, seen = [], [], set()
    for item in items:
        override = _parse(parser, item)
        key = override.key_or_group
        if key in seen:
            raise ConfigError(f"--multirun: {key} is given twice ({item!r}); give each key once")
        seen.add(key)
        if not override.is_sweep_override():
            value = override.value()
            fixed.append(Setting(key, value, _text(value)))
            continue
        if override.value_type not in SWEEPS:
            raise ConfigError(f"--multirun: {item!r}: {override.value_type.name.lower().replace('_', ' ')} cannot be "
                              f"run (use comma lists, choice(...) or range(...))")
        values = [_plain(v) for v in override.sweep_iterator()]
        if not values:
            raise ConfigError(f"--multirun: {item!r} gives no value to run")
        axes.append(tuple(Setting(key, value, _text(value)) for value in values))
    return Sweep(tuple(fixed), tuple(axes))


def is_sweep(item: str) -> bool:
    """Whether ``item`` reads as a sweep in Hydra's grammar (a comma list, ``range(...)``...); an item Hydra cannot
    parse is not one (a single run reads it with OmegaConf)."""
    if "=" not in item:
        return False
    try:
        return OverridesParser.create().parse_override(item).is_sweep_override()
    except HydraException:
        return False


def run_name(point: Sequence[Setting]) -> str:
    """A run's folder name: its swept settings, "key=value" joined by commas ("seed=1,optimizer.net.lr=0.001")."""
    name = ",".join(f"{s.key}={s.text}" for s in point).replace("/", "_")
    if len(name) > NAME_MAX:
        raise ConfigError(f"--multirun: the run folder name {name[:60]}... would be longer than {NAME_MAX} characters; "
                          f"sweep fewer or shorter values")
    return name


def _parse(parser: OverridesParser, item: str) -> Override:
    try:
        override = parser.parse_override(item)
    except HydraException as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--multirun: command-line override {item!r}: not in Hydra's override grammar "
                          f"({first_line}); quote a value that holds spaces, commas or quotes: key='a, b'") from None
    if override.type != OverrideType.CHANGE:
        raise ConfigError(f"--multirun: {item!r}: the option file's keys are fixed; set one with key=value "
                          f"(Hydra's +key and ~key add or delete keys)")
    return override


def _plain(value: Any) -> Any:
    """A swept value as plain Python: Hydra leaves the quoted strings of a sweep quoted (``QuotedString``)."""
    if isinstance(value, QuotedString):
        return value.text
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
