"""A run config from a YAML file and dotted command-line flags, and the help text of every key.

A run is described by a YAML file with the sections of `RunConfig`, then adjusted by dotted
flags, the habit VeOmni, Axolotl and torchtitan users bring:

    qwen35 train configs/text/sft.yaml --model.path ~/Qwen3.5-9B --train.max_steps=20

Values are checked against the field's type when they are read, so a typo fails before a model
is loaded: an unknown key names the closest known one, a bad value names the key and the type it
expects.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from qwen35.train.config import RunConfig


def sections_of(config_cls: type) -> dict[str, type]:
    """Section name -> its dataclass, in field order: `RunConfig`'s for `train`, the GRPO run
    config's (`qwen35.rl.config`) for `rl`; one parser reads both."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def load_run_config(yaml_path: str | Path | None, overrides: list[str], config_cls: type = RunConfig):
    """Defaults, then the YAML file's values, then the command-line overrides, last one winning.

    `overrides` are the arguments after the YAML path: `--train.max_steps 20`,
    `--train.max_steps=20`, or a bare `--train.compile` for true.
    """
    sections = sections_of(config_cls)
    values: dict[str, dict[str, Any]] = {name: {} for name in sections}
    if yaml_path is not None:
        _merge_yaml(values, Path(yaml_path), sections)
    for key, raw in _split_overrides(overrides, sections):
        section, name = _resolve_key(key, "command line", sections)
        values[section][name] = _coerce(raw, section, name, "command line", sections)
    defaults = config_cls()  # a section's defaults may differ from its class's (GRPO's learning rate)
    return config_cls(**{s: dataclasses.replace(getattr(defaults, s), **values[s]) for s in sections})


def override_keys(overrides: list[str], config_cls: type = RunConfig) -> set[str]:
    """The `section.key`s that command-line `overrides` set (unknown keys raise as in loading)."""
    sections = sections_of(config_cls)
    return {".".join(_resolve_key(key, "command line", sections)) for key, _ in _split_overrides(overrides, sections)}


def _merge_yaml(values: dict[str, dict[str, Any]], path: Path, sections: dict[str, type]) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"run config {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from None
    if doc is None:
        return
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping of sections ({', '.join(sections)})")
    for section, entries in doc.items():
        if section not in sections:
            close = difflib.get_close_matches(str(section), list(sections), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else f"sections are: {', '.join(sections)}"
            raise ValueError(f"{path}: unknown section {section!r}; {hint}")
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping of keys to values")
        for name, value in entries.items():
            section_, name_ = _resolve_key(f"{section}.{name}", str(path), sections)
            values[section_][name_] = _coerce(value, section_, name_, str(path), sections)


def _split_overrides(args: list[str], sections: dict[str, type]) -> list[tuple[str, Any]]:
    pairs = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"command line: unexpected argument {arg!r}; overrides look like "
                             "--section.key value or --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if eq:
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 2
        elif _takes_bool(_field_type(*_resolve_key(key, "command line", sections), sections)):
            value = "true"
            i += 1
        else:
            raise ValueError(f"command line: --{key} needs a value")
        pairs.append((key, value))
    return pairs


def _takes_bool(tp: Any) -> bool:
    return tp is bool or bool in typing.get_args(tp)


# Keys of earlier releases -> what to write instead.
REPLACED_KEYS = {
    "train.offload_activations": "set train.activation_checkpointing: offload",
}


def _resolve_key(key: str, source: str, sections: dict[str, type]) -> tuple[str, str]:
    """`section.name` → (section, name), or a ValueError naming the closest known key."""
    section, _, name = key.partition(".")
    if section in sections and name in _names(sections[section]):
        return section, name
    if key in REPLACED_KEYS:
        raise ValueError(f"{source}: {key} is gone: {REPLACED_KEYS[key]}")
    all_keys = [f"{s}.{n}" for s, cls in sections.items() for n in _names(cls)]
    # A right key in the wrong section (train.lr) is a likelier slip than a misspelling.
    elsewhere = [k for k in all_keys if k.endswith(f".{name}")]
    if section in sections:  # compare names only: a shared "train." prefix says nothing
        close = difflib.get_close_matches(name, _names(sections[section]), n=1, cutoff=0.6)
        close = [f"{section}.{n}" for n in close]
    else:
        close = difflib.get_close_matches(key, all_keys, n=1, cutoff=0.6)
    guess = elsewhere or close
    if guess:
        hint = f"did you mean {' or '.join(guess)}?"
    elif section in sections:
        hint = f"{section} has: {', '.join(_names(sections[section]))}"
    else:
        hint = f"sections are: {', '.join(sections)}"
    raise ValueError(f"{source}: unknown key {key!r}; {hint}")


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _field_type(section: str, name: str, sections: dict[str, type]) -> Any:
    return typing.get_type_hints(sections[section])[name]


def _coerce(value: Any, section: str, name: str, source: str, sections: dict[str, type]) -> Any:
    """Check a YAML value or parse a command-line string into the field's type."""
    tp = _field_type(section, name, sections)
    try:
        value = _to_type(value, tp)
    except (TypeError, ValueError):
        expected = _type_name(tp)
        raise ValueError(f"{source}: {section}.{name} = {value!r}: expected {expected}") from None
    is_path = sections[section].__dataclass_fields__[name].metadata["path"]
    return os.path.expanduser(value) if is_path and isinstance(value, str) else value


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none", "~"}


def _to_type(value: Any, tp: Any) -> Any:
    """Raise TypeError/ValueError if `value` (a YAML value or a flag's string) is not a `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    is_str = isinstance(value, str)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (is_str and value.lower() in _NULL)):
            return None
        for member in (a for a in args if a is not type(None)):
            try:
                return _to_type(value, member)
            except (TypeError, ValueError):
                pass
        raise ValueError(value)
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(value)
    if origin in (tuple, list):
        if is_str:  # a flag: YAML flow syntax, e.g. [0.9, 0.95]
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise TypeError(value)
        if origin is list:
            return [_to_type(v, args[0]) for v in value]
        if len(value) != len(args):
            raise ValueError(value)
        return tuple(_to_type(v, a) for v, a in zip(value, args))
    if origin is dict:
        if is_str:  # a flag: YAML flow syntax, e.g. {enable_thinking: false}
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise TypeError(value)
        return {_to_type(k, args[0]): v if args[1] is Any else _to_type(v, args[1])
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if is_str and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError(value)
        return int(value)
    if tp is float:
        # YAML 1.1 reads `1e-5` (no dot) as a string; accept it as the number it plainly is.
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(value)
        return float(value)
    if tp is str:
        if is_str:
            return value
        raise TypeError(value)
    raise AssertionError(f"unsupported config field type {tp}")


# --- help -----------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (tuple, list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if tp is Any:
        return "Any"
    return "None" if tp is type(None) else tp.__name__


def _default_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    if value is None:  # spelled as in the YAML file
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def format_help(config_cls: type = RunConfig) -> str:
    """Every key with its type, default and help line, grouped by section."""
    lines = ["Run config keys (set in the YAML file or override with --section.key VALUE):"]
    defaults = config_cls()
    for section, cls in sections_of(config_cls).items():
        lines += ["", f"{section}: {cls.__doc__.strip()}"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            lines.append(f"  --{section}.{f.name}  ({_type_name(hints[f.name])}, "
                         f"default: {_default_text(getattr(getattr(defaults, section), f.name))})")
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines) + "\n"
