"""Command-line flags and config-file keys, derived from the settings dataclasses' fields.

Each field of :class:`~dynlora.training.settings.TrainSettings` and of :class:`~dynlora.config.DynamicLoRAConfig`
is one flag (``--max-length``; a field may name its own with ``flag=`` in its metadata, e.g. ``--schedule-warmup``
for the adapter's ``warmup``) and one config-file key: the flag's name with underscores, at the top level
(``schedule_warmup: 0.2``), or the field's own name under ``adapter:`` (``adapter: {warmup: 0.2}``). Values are
typed as the field declares, from a command-line string or a YAML/JSON value, and a wrong one is one error line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from ..config import ALL_LINEAR
from .data.glue import finite_number

ADAPTER = "adapter"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting as the command line and config files see it."""

    field: dataclasses.Field
    kind: Any  # the field's resolved type hint
    adapter: bool  # a DynamicLoRAConfig field (nested under ``adapter``)

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def flag(self) -> str:
        return self.field.metadata.get("flag") or "--" + self.name.replace("_", "-")

    @property
    def key(self) -> str:
        """Top-level config-file key: the flag's name with underscores."""
        return self.flag[2:].replace("-", "_")

    @property
    def dest(self) -> str:
        return f"{ADAPTER}.{self.name}" if self.adapter else self.name

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")

    @property
    def default(self) -> Any:
        if self.field.default is not dataclasses.MISSING:
            return self.field.default
        return self.field.default_factory()  # type: ignore[misc]


def settings_of(cls: type, adapter: bool = False) -> list[Setting]:
    hints = typing.get_type_hints(cls)
    return [Setting(f, hints[f.name], adapter) for f in dataclasses.fields(cls) if f.name != ADAPTER]


def _options(kind: Any) -> tuple[Any, ...]:
    """The members of a union type (``int | None`` -> (int, NoneType)), or the type itself."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return typing.get_args(kind)
    return (kind,)


def convert(setting: Setting, value: Any, from_text: bool = False) -> Any:
    """``value`` as ``setting`` declares it; ``from_text``: a command-line string. ValueError on a wrong type."""
    options = _options(setting.kind)
    name = setting.key

    def wrong(expected: str) -> ValueError:
        return ValueError(f"setting {name} must be {expected}, got {value!r}")

    if value is None or (type(None) in options and isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in options:
            return None
        raise wrong("given a value")
    if bool in options:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
        raise wrong("true or false")
    if int in options or float in options:
        if isinstance(value, bool):
            raise wrong("a number")
        number = finite_number(value) if isinstance(value, str | int | float) else None
        if number is None:
            raise wrong("a number" if float in options else "an integer")
        if float not in options:
            if not number.is_integer():
                raise wrong("an integer")
            return int(number)
        if int in options:  # a schedule point: a fraction of the run (<= 1) or a step count (a whole number > 1)
            return int(number) if number > 1 and number.is_integer() else number
        return number
    if dict in {typing.get_origin(o) for o in options}:
        return _mapping(setting, value, from_text, wrong)
    if list in {typing.get_origin(o) for o in options}:
        return _names(setting, value, from_text, wrong, str in options)
    if str in options:
        if not isinstance(value, str):
            raise wrong("a string")
        choices = setting.field.metadata.get("choices")
        if choices and value.lower() not in choices:
            raise wrong(f"one of {', '.join(choices)}" + (" (or none)" if type(None) in options else ""))
        return value.lower() if choices else value
    raise TypeError(f"no conversion for setting {name} of type {setting.kind}")  # a declaration bug, not user input


def _mapping(setting: Setting, value: Any, from_text: bool, wrong) -> dict:
    if from_text:
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise wrong("a JSON object such as '{\"layer\\\\.0\\\\.\": 4}'") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise wrong("a mapping of name patterns to numbers")
    out = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise wrong("a mapping of name patterns to numbers")
        out[k] = v
    return out


def _names(setting: Setting, value: Any, from_text: bool, wrong, regex_allowed: bool) -> list[str] | str:
    if from_text:
        if regex_allowed and value == ALL_LINEAR:
            return value
        if regex_allowed and value.startswith("re:"):
            return value[3:]
        return [t.strip() for t in value.split(",") if t.strip()]
    if isinstance(value, str) and regex_allowed:
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise wrong("a list of module names" + (" or one regex" if regex_allowed else ""))
    return value


def add_flags(parser: argparse.ArgumentParser, settings: list[Setting], title: str | None = None) -> None:
    """One flag per setting. A flag not given leaves no attribute (SUPPRESS), so a config file's value stays."""
    group = parser.add_argument_group(title) if title else parser
    for s in settings:
        text = s.help + ("" if s.default is None else f" (default: {_shown(s.default)})")
        if bool in _options(s.kind):
            group.add_argument(
                s.flag, dest=s.dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text
            )
        else:
            group.add_argument(s.flag, dest=s.dest, default=argparse.SUPPRESS, metavar=s.key.upper(), help=text)


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(value) if value else "none"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def from_args(args: argparse.Namespace, settings: list[Setting]) -> dict[str, Any]:
    """Settings given as flags, typed: ``{name: value}`` plus ``{"adapter": {...}}``."""
    out: dict[str, Any] = {}
    given = vars(args)
    for s in settings:
        if s.dest in given:
            value = convert(s, given[s.dest], from_text=True)
            (out.setdefault(ADAPTER, {}) if s.adapter else out)[s.name] = value
    return out


def from_mapping(data: dict[str, Any], settings: list[Setting], where: str) -> dict[str, Any]:
    """Settings of a config file's mapping, typed: top-level keys as the flags name them, adapter settings also
    by their own names under ``adapter:``. Unknown keys are an error listing where to look."""
    by_key = {s.key: s for s in settings}
    adapter_by_name = {s.name: s for s in settings if s.adapter}
    out: dict[str, Any] = {}
    nested = data.get(ADAPTER) or {}
    if not isinstance(nested, dict):
        raise ValueError(f"{where}: {ADAPTER} must be a mapping of adapter settings, got {nested!r}")
    unknown = sorted(k for k in data if k != ADAPTER and k not in by_key)
    unknown += sorted(f"{ADAPTER}.{k}" for k in nested if k not in adapter_by_name)
    if unknown:
        raise ValueError(
            f"{where}: unknown setting(s) {', '.join(map(str, unknown))}; a key is a flag's name with underscores "
            f"(rank, schedule_warmup, lr, ...) or an adapter field under {ADAPTER}: (see dynlora train --help)"
        )
    for key, value in data.items():
        if key != ADAPTER:
            s = by_key[key]
            (out.setdefault(ADAPTER, {}) if s.adapter else out)[s.name] = convert(s, value)
    for name, value in nested.items():
        out.setdefault(ADAPTER, {})[name] = convert(adapter_by_name[name], value)
    return out


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Settings layered left to right; ``adapter`` dicts are merged key by key."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            out[key] = {**out.get(key, {}), **value} if key == ADAPTER else value
    return out


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``) or JSON file; one error line naming the file otherwise."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} not found" + (" (it is a directory)" if file.is_dir() else ""))
    suffix = file.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"config file {path}: name it .yaml, .yml or .json (that says how to read it)")
    try:
        text = file.read_text(encoding="utf-8")
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not UTF-8 text") from None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"config file {path} cannot be parsed: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings")
    return data
