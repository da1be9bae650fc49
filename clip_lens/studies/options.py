"""Study options: one frozen, keyword-only dataclass per study, checked when it is made.

Each field is declared with `option(...)`, which records what is allowed (the type comes from the
annotation; `choices`, `minimum`, `maximum`, `min_items` narrow it) and the help text. The same
declaration drives the three places an option is read:

- Python: `Options(limit=10)`; a wrong value raises `OptionError` naming the option and what is
  allowed (`Options(limit=-1)` -> "limit=-1: give an integer >= 1, or None");
- the command line: `add_option_flags(parser, Options)` adds `--limit` and friends, and
  `options_from_args(Options, args)` builds the dataclass from the flags a user gave, so every
  default is the dataclass's own (flags that were not given are not passed);
- sweep specs: `options_from_mapping(Options, table)` refuses unknown keys and wrong types when the
  spec is read (TOML arrays become tuples).

    @dataclass(frozen=True, kw_only=True)
    class Options(StudyOptions):
        limit: Optional[int] = option(None, "use the first N instances only", minimum=1)
        grey: bool = option(False, "a grey mean colour instead of per-channel")
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

from clip_lens.checks import is_integer

INT64 = 2**63  # integers lie in [-INT64, INT64)


class OptionError(ValueError):
    """An option value that is not allowed; the message names the option and what is allowed."""


def option(default: Any, help: str, *, choices: Optional[Sequence] = None, minimum: Optional[float] = None,
           maximum: Optional[float] = None, min_items: int = 0, python_only: bool = False,
           flags: Optional[Sequence[str]] = ()) -> Any:
    """A study option: its default, help text and what is allowed (see the module docstring).

    Args:
        python_only: neither the command line nor a sweep spec sets it (an option that takes a
            Python object is set from Python only).
        flags: other command-line spellings kept for an option whose flag predates it ("--random");
            None: no flag of its own (the command sets it otherwise, e.g. from a positional choice).
    """
    if isinstance(default, list):  # (dataclasses.MISSING as the default: a required field)
        raise TypeError("give a tuple as a sequence option's default (options are frozen)")
    meta = dict(help=help, choices=tuple(choices) if choices is not None else None, minimum=minimum, maximum=maximum,
                min_items=min_items, cli=not python_only and flags is not None, sweep=not python_only,
                flags=tuple(flags or ()))
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckedFields:
    """A frozen dataclass whose fields (declared with `option`) are checked, and sequences made
    tuples, when the object is made; sweep specs read their model, dataset and resource tables
    through such classes too."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = _checked(field.name, getattr(self, field.name), hints[field.name], field.metadata)
            object.__setattr__(self, field.name, value)

    def replace(self, **changes: Any) -> "CheckedFields":
        """A copy with `changes`, checked like a new one."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """Every option by name (part of a run's identity and manifest)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyOptions(CheckedFields):
    """Base of every study's `Options`. `NOT_IN_IDENTITY` names options that change memory or
    speed and no number beyond float rounding (the engine's batch sizes): a killed run resumes
    whatever they are set to."""

    NOT_IN_IDENTITY: ClassVar[tuple[str, ...]] = ()


# --- checks --------------------------------------------------------------------------------------
def _optional_inner(hint: Any) -> tuple[bool, Any]:
    """(None allowed, the type without None)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return True, args[0]
    return False, hint


def _sequence_item(hint: Any) -> Optional[Any]:
    """The item type of `tuple[X, ...]`, or None for a scalar type."""
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
    return None


def _describe(kind: Any, meta: Mapping) -> str:
    if meta["choices"] is not None:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    name = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(kind, getattr(kind, "__name__", str(kind)))
    bounds = [f">= {meta['minimum']:g}"] if meta["minimum"] is not None else []
    bounds += [f"<= {meta['maximum']:g}"] if meta["maximum"] is not None else []
    return name + (" " + " and ".join(bounds) if bounds else "")


def _scalar(name: str, value: Any, kind: Any, meta: Mapping, allowed: str) -> Any:
    """`value` checked against a scalar type (int, float, bool, str) and the field's bounds: an
    integer fits 64 bits (TOML's integers, torch's seeds), a number is finite."""
    ok = {int: is_integer(value) and -INT64 <= value < INT64,
          float: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
          bool: isinstance(value, bool), str: isinstance(value, str)}.get(kind, True)
    if not ok:
        raise OptionError(f"{name}={value!r}: give {allowed}")
    if kind is float:
        value = float(value)
    if kind is int:
        value = int(value)
    if meta["choices"] is not None and value not in meta["choices"]:
        raise OptionError(f"{name}={value!r}: give {allowed}")
    if (meta["minimum"] is not None and value < meta["minimum"]) or (meta["maximum"] is not None and value > meta["maximum"]):
        raise OptionError(f"{name}={value!r}: give {allowed}")
    return value


def _checked(name: str, value: Any, hint: Any, meta: Mapping) -> Any:
    nullable, inner = _optional_inner(hint)
    if value is None:
        if nullable:
            return None
        raise OptionError(f"{name}=None: give {_describe(_sequence_item(inner) or inner, meta)}")
    item = _sequence_item(inner)
    if item is None:
        allowed = _describe(inner, meta) + (", or None" if nullable else "")
        return _scalar(name, value, inner, meta, allowed)
    allowed = f"a list of {'at least ' + str(meta['min_items']) + ' ' if meta['min_items'] else ''}values, each " \
              + _describe(item, meta) + (", or None" if nullable else "")
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise OptionError(f"{name}={value!r}: give {allowed}")
    if len(value) < meta["min_items"]:
        raise OptionError(f"{name}={list(value)!r}: give {allowed}")
    return tuple(_scalar(name, v, item, meta, allowed) for v in value)


# --- front ends ----------------------------------------------------------------------------------
def flag_name(field_name: str) -> str:
    """The command-line flag of an option: `pair_chunk` -> `--pair-chunk`."""
    return "--" + field_name.replace("_", "-")


def add_option_flags(parser: argparse.ArgumentParser, options: type, *, skip: Sequence[str] = ()) -> None:
    """One flag per command-line option of `options`; a flag not given is not set (argparse's
    SUPPRESS), so the dataclass's default applies."""
    hints = typing.get_type_hints(options)
    for field in dataclasses.fields(options):
        if not field.metadata.get("cli", False) or field.name in skip:
            continue
        nullable, inner = _optional_inner(hints[field.name])
        item = _sequence_item(inner)
        meta = field.metadata
        shown = field.default if not isinstance(field.default, tuple) else " ".join(map(str, field.default))
        text = f"{meta['help']} (default {shown})"
        kwargs: dict = dict(dest=field.name, default=argparse.SUPPRESS, help=text)
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = item or inner
            if item is not None:
                kwargs["nargs"] = "+" if meta["min_items"] else "*"
            if meta["choices"] is not None:
                kwargs["choices"] = list(meta["choices"])
        parser.add_argument(flag_name(field.name), *meta["flags"], **kwargs)


def options_from_args(options: type, args: argparse.Namespace, **extra: Any) -> StudyOptions:
    """`options` built from the flags given on the command line (and `extra` values)."""
    names = {field.name for field in dataclasses.fields(options)}
    given = {name: value for name, value in vars(args).items() if name in names}
    return options(**{**given, **extra})


def options_from_mapping(options: type, table: Mapping[str, Any], where: str) -> CheckedFields:
    """`options` from a sweep spec's table; unknown keys and wrong values are refused, the error
    naming `where` (the spec and entry) and the key."""
    keys = {field.name for field in dataclasses.fields(options) if field.metadata.get("sweep", False)}
    unknown = sorted(set(table) - keys)
    if unknown:
        raise OptionError(f"{where} has unknown key {unknown[0]!r} (allowed: {', '.join(sorted(keys)) or 'none'})")
    required = [f.name for f in dataclasses.fields(options) if f.default is dataclasses.MISSING and f.name not in table]
    if required:
        raise OptionError(f"{where} needs key {required[0]!r}")
    try:
        return options(**table)
    except OptionError as error:
        raise OptionError(f"{where}: key {error}") from None
