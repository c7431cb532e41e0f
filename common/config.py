"""TOML configuration with environment overrides: the one loader both programs use.

A program describes its configuration as a frozen dataclass (the root) whose fields are sections
(dataclasses, one TOML table each) or top-level scalars. `load` reads the TOML file, applies the
environment, converts every value to its field's type and builds the dataclasses:

* Environment: `PREFIX__SECTION__KEY=value` sets a key of a section, `PREFIX__KEY=value` a top-level
  key (e.g. `EDGE_NODE__MQTT__HOST=gw.local`, `CLOUD_BRIDGE__STATE_DIR=/var/lib/bridge`). A value is
  text typed by the field it sets, so a password of digits stays a string and a port becomes a
  number; a list is `a,b` or TOML `["a", "b"]`, a table `id=value,id2=value2`; an empty value sets an
  optional key to none. A variable whose name nearly matches (one underscore short) is refused, not
  silently ignored, except for a program's documented older form, which is accepted with a warning.
* Paths: a relative path is relative to the config file's folder (the working directory without a
  file), so a config works wherever the program is started from.
* A section may be a tagged union: several dataclasses told apart by their `kind` field (e.g.
  `[source] kind = "replay"`); only the chosen kind's keys are accepted.
* Checks: a section's `validate()` method, if any, raises ValueError with a message that starts
  with the key; the root's `validate()` checks across sections. Every problem is raised as the
  caller's `error` type with the section named, so each program's errors stay in its own tree.
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

log = logging.getLogger(__name__)

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class EnvForm:
    """How a program's variables are spelled: `prefix` (e.g. "EDGE_NODE") + "__SECTION__KEY".
    `legacy` is an older prefix still accepted with a warning (e.g. "CLOUD_BRIDGE_" + "SECTION__KEY")."""

    prefix: str
    legacy: str | None = None

    @property
    def example(self) -> str:
        return f"{self.prefix}__SECTION__KEY, e.g. {self.prefix}__MQTT__HOST"


T = TypeVar("T")


def load(
    root: type[T],
    path: Path | None,
    environ: Mapping[str, str],
    env: EnvForm,
    error: type[Exception],
) -> T:
    """The validated configuration: `path` (optional) overridden by `environ`."""
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise error(f"config file {path} does not exist: pass --config with an existing TOML file") from None
        except IsADirectoryError:
            raise error(f"config file {path} is a directory: pass --config with a TOML file") from None
        except tomllib.TOMLDecodeError as exc:
            raise error(f"config file {path} is not valid TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise error(f"config file {path} cannot be read: {exc}") from None
        base = Path(path).resolve().parent
    try:
        _apply_env(data, environ, env, root)
    except _Problem as exc:
        raise error(str(exc)) from None
    return from_dict(root, data, base, error)


def from_dict(root: type[T], data: Mapping[str, Any], base: Path, error: type[Exception]) -> T:
    """The validated configuration from tables as TOML would give them (Path values allowed): the
    same conversion and checks as a file, for configurations written in code (tests, the demo)."""
    try:
        config: T = _build_root(root, dict(data), base)
    except _Problem as exc:
        raise error(str(exc)) from None
    check(config, error)
    return config


def check(config: Any, error: type[Exception]) -> None:
    """Run every section's `validate()` and then the root's, as `load` does: for a configuration built
    in code (tests, benchmarks, the demo) that must pass the same checks as a file."""
    try:
        for f in dataclasses.fields(config):
            if _is_section(typing.get_type_hints(type(config))[f.name]):
                _validate_section(f.name, getattr(config, f.name))
        root_check = getattr(config, "validate", None)
        if root_check is not None:
            try:
                root_check()
            except ValueError as exc:  # checks across sections name their keys themselves
                raise _Problem(str(exc)) from None
    except _Problem as exc:
        raise error(str(exc)) from None


class _Problem(Exception):
    """A problem found while loading; re-raised as the caller's error type."""


# ---- the environment ----------------------------------------------------------------------------


class EnvValue(str):
    """A value from the environment: text until the field it sets says what it should be."""

    __slots__ = ()


def _apply_env(data: dict[str, Any], environ: Mapping[str, str], env: EnvForm, root: type[Any]) -> None:
    prefix = env.prefix + "__"
    hints = typing.get_type_hints(root)
    sections = {f.name for f in dataclasses.fields(root) if _is_section(hints[f.name])}
    scalars = {f.name for f in dataclasses.fields(root)} - sections
    for name, raw in sorted(environ.items()):
        if name.startswith(prefix):
            parts = name[len(prefix) :].lower().split("__")
        elif env.legacy is not None and name.startswith(env.legacy):
            parts = name[len(env.legacy) :].lower().split("__")
            if (len(parts) == 2 and parts[0] in sections) or (len(parts) == 1 and parts[0] in scalars):
                log.warning("environment variable %s: this form is deprecated, use %s", name, env.example)
        elif name.startswith(env.prefix + "_") or name == env.prefix:
            raise _Problem(f"environment variable {name}: use {env.example}")
        else:
            continue
        if len(parts) == 2 and parts[0] in sections:
            table = data.setdefault(parts[0], {})
            if not isinstance(table, dict):
                raise _Problem(f"environment variable {name} sets a key of [{parts[0]}], which is not a table")
            table[parts[1]] = EnvValue(raw)
        elif len(parts) == 1 and parts[0] in scalars:
            data[parts[0]] = EnvValue(raw)
        else:
            raise _Problem(f"environment variable {name}: use {env.example}")


# ---- building the dataclasses ---------------------------------------------------------------------


def _is_section(hint: Any) -> bool:
    members = typing.get_args(hint) if typing.get_origin(hint) in (types.UnionType, typing.Union) else (hint,)
    return all(dataclasses.is_dataclass(m) for m in members)


def _build_root(root: type[Any], data: dict[str, Any], base: Path) -> Any:
    hints = typing.get_type_hints(root)
    fields = {f.name for f in dataclasses.fields(root)}
    unknown = sorted(set(data) - fields)
    if unknown:
        sections = sorted(n for n in fields if _is_section(hints[n]))
        scalars = sorted(n for n in fields if not _is_section(hints[n]))
        known = ", ".join([*(f"[{s}]" for s in sections), *scalars])
        raise _Problem(f"unknown key(s) or section(s) {', '.join(unknown)}: known are {known}")
    kwargs: dict[str, Any] = {}
    for name in sorted(data):
        hint, value = hints[name], data[name]
        if _is_section(hint):
            if not isinstance(value, dict):
                raise _Problem(f"[{name}] must be a table, got {value!r}")
            kwargs[name] = _build_section(name, hint, value, base)
        else:
            kwargs[name] = coerce(name, value, hint, base)
    return root(**kwargs)


def _build_section(section: str, hint: Any, values: Mapping[str, Any], base: Path) -> Any:
    cls = _pick_kind(section, hint, values) if typing.get_origin(hint) in (types.UnionType, typing.Union) else hint
    hints = typing.get_type_hints(cls)
    names: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        names[f.name] = f.name
        for alias in f.metadata.get("aliases", ()):
            names[alias] = f.name
    unknown = sorted(set(values) - set(names))
    if unknown:
        kind = f' of kind = "{values["kind"]}"' if "kind" in values and cls is not hint else ""
        raise _Problem(
            f"unknown key(s) {', '.join(f'[{section}] {k}' for k in unknown)}{kind}: "
            f"known keys are {', '.join(sorted(f.name for f in dataclasses.fields(cls)))}"
        )
    kwargs = {names[k]: coerce(f"[{section}] {k}", v, hints[names[k]], base) for k, v in values.items()}
    return cls(**kwargs)


def _pick_kind(section: str, hint: Any, values: Mapping[str, Any]) -> type[Any]:
    """The member of a tagged union whose `kind` is the table's (the first member's when absent)."""
    members = typing.get_args(hint)
    kinds = {typing.get_args(typing.get_type_hints(m)["kind"])[0]: m for m in members}
    kind = values.get("kind", next(iter(kinds)))
    if kind not in kinds:
        raise _Problem(f"[{section}] kind = {str(kind)!r} is not allowed: use one of {', '.join(map(repr, kinds))}")
    chosen: type[Any] = kinds[kind]
    return chosen


def _validate_section(section: str, value: Any) -> None:
    check = getattr(value, "validate", None)
    if check is None:
        return
    try:
        check()
    except ValueError as exc:
        raise _Problem(f"[{section}] {exc}") from None


# ---- values ---------------------------------------------------------------------------------------


def coerce(key: str, value: Any, hint: Any, base: Path) -> Any:
    """`value` (TOML, or text from the environment) as the field's type, or a problem naming `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    source = " (from the environment)" if isinstance(value, EnvValue) else ""
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, EnvValue) and value == "" and type(None) in args):
            return None
        return coerce(key, value, inner[0], base)
    if origin is Literal:
        if value not in args:
            raise _Problem(f"{key} = {value!r}{source} is not allowed: use one of {', '.join(map(repr, args))}")
        return value
    if origin is dict:
        return _str_map(key, value)
    if origin is tuple:
        return tuple(coerce(key, item, args[0], base) for item in _items(key, value))
    if hint is Path:
        if not isinstance(value, str | Path) or not str(value):
            raise _Problem(f"{key} must be a path string, got {value!r}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path
    if hint is bool:
        return _bool(key, value, source)
    if hint is int or hint is float:
        return _number(key, value, hint, source)
    if hint is str:
        if not isinstance(value, str):
            raise _Problem(f"{key} must be a string, got {value!r}")
        return str(value)
    raise _Problem(f"{key}: unsupported type {hint}")  # a bug in a config dataclass, not in the file


def _items(key: str, value: Any) -> list[Any]:
    if isinstance(value, EnvValue):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                raise _Problem(f"{key} = {text!r} (from the environment) is not a valid TOML list") from None
            return list(parsed)
        return [EnvValue(item.strip()) for item in text.split(",") if item.strip()]
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise _Problem(f'{key} must be a list, e.g. ["a", "b"], got {value!r}')
    return value


def _str_map(key: str, value: Any) -> dict[str, str]:
    """A TOML table of strings, or "k=v,k2=v2" from the environment (a value may contain '=')."""
    if isinstance(value, str):
        pairs = [item.strip().partition("=") for item in value.split(",") if item.strip()]
        if any(not k.strip() or not sep for k, sep, _ in pairs):
            raise _Problem(f'{key} must be a table or "id=value,id2=value2", got {value!r}')
        return {k.strip(): v.strip() for k, _, v in pairs}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _Problem(f'{key} must be a table of strings, e.g. {key.split()[-1]} = {{"id" = "value"}}')
    return {str(k): v for k, v in value.items()}


def _bool(key: str, value: Any, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, EnvValue) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _Problem(f"{key} = {str(value)!r}{source} must be true or false")


def _number(key: str, value: Any, hint: type[int] | type[float], source: str) -> int | float:
    kind = "an integer" if hint is int else "a number"
    if isinstance(value, EnvValue):
        try:
            parsed = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            raise _Problem(f"{key} = {str(value)!r}{source} must be {kind}") from None
        value = parsed
    if isinstance(value, bool) or not isinstance(value, int | float) or (hint is int and isinstance(value, float)):
        raise _Problem(f"{key} must be {kind}, got {value!r}{source}")
    return hint(value)


__all__ = ["EnvForm", "EnvValue", "check", "coerce", "from_dict", "load"]
