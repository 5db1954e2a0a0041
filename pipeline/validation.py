"""What every config section shares: fields declared with their flag, help and allowed values, one
generic check of those declarations, and one error type that names the flag as the user types it.

A section is a frozen dataclass deriving from :class:`Section`. Its fields are declared with
:func:`option`, which records the help text, the flag (``--batch-size`` for ``batch_size`` unless
given), the allowed choices or range. ``Section.__post_init__`` checks every field against its type
and those declarations, then calls the section's own ``check`` for rules that involve several
fields. The command line (``launch/cli.py``) is generated from the same declarations, so a flag, its
help, its default and its check cannot drift apart.
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, Field, field, fields
from types import NoneType, UnionType
from typing import Any, ClassVar


class ConfigError(ValueError):
    """Bad input. ``where`` is the flag as the user types it (``--batch-size``), or a file."""

    def __init__(self, where: str, message: str):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}")


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    low: float | None = None,
    high: float | None = None,
    cli: bool = True,
    default_factory: Any = MISSING,
) -> Any:
    """A config field: its default, help text, flag and allowed values (choices, or low..high)."""
    metadata = {"help": help, "flag": flag, "choices": choices, "low": low, "high": high, "cli": cli}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def field_flag(item: Field) -> str:
    return item.metadata.get("flag") or flag_of(item.name)


def plain_type(hint: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of a hint such as ``int`` or ``str | None``."""
    if isinstance(hint, UnionType) or typing.get_origin(hint) is typing.Union:
        args = [arg for arg in typing.get_args(hint) if arg is not NoneType]
        return (args[0] if len(args) == 1 else hint), len(args) < len(typing.get_args(hint))
    return hint, False


def _describe(kind: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(kind, str(kind))


def check_value(where: str, kind: Any, value: Any) -> None:
    """Raise ConfigError unless ``value`` has the scalar type ``kind`` (an int counts as a float)."""
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        str: lambda v: isinstance(v, str),
    }.get(kind)
    if ok is not None and not ok(value):
        raise ConfigError(where, f"must be {_describe(kind)} (got {value!r})")


class Section:
    """Base of every config dataclass (declared ``@dataclass(frozen=True)``)."""

    hints_cache: ClassVar[dict[type, dict[str, Any]]] = {}

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        if cls not in Section.hints_cache:
            Section.hints_cache[cls] = typing.get_type_hints(cls)
        return Section.hints_cache[cls]

    @classmethod
    def flag(cls, name: str) -> str:
        return next(field_flag(item) for item in fields(cls) if item.name == name)  # type: ignore[arg-type]

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.flag(name), message)

    def __post_init__(self) -> None:
        types = self.field_types()
        for item in fields(self):  # type: ignore[arg-type]
            value = getattr(self, item.name)
            kind, optional = plain_type(types[item.name])
            if value is None and optional:
                continue
            where = field_flag(item)
            if kind in (bool, int, float, str):
                check_value(where, kind, value)
            choices, low, high = item.metadata.get("choices"), item.metadata.get("low"), item.metadata.get("high")
            if choices is not None and value not in choices:
                raise ConfigError(where, f"{value!r} is not one of {', '.join(choices)}")
            if low is not None and not low <= value <= (math.inf if high is None else high):
                if high is None:
                    raise ConfigError(where, f"must be at least {low:g} (got {value!r})")
                raise ConfigError(where, f"must be between {low:g} and {high:g} (got {value!r})")
        self.check()

    def check(self) -> None:
        """Checks that involve several fields; raise ``self.error(field, message)``."""
