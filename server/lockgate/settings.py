"""Server settings declared once: each ``ServerConfig`` field says its flag, env and help.

A field of ``ServerConfig`` (config.py) declared with ``setting(...)`` becomes
the flag ``--field-name`` of ``lockgate serve`` and the environment variable
``LOCKGATE_FIELD_NAME``, both read by the same parser, so a value is checked
the same way wherever it comes from. A flag given on the command line wins
over the environment, which wins over the declared default.

A bad value stops the server with one line naming the flag or the variable
and what it accepts (``SettingError``), never a traceback and never a silent
fallback to the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "LOCKGATE_"

#: Groups of ``lockgate serve --help``, in this order.
GROUPS = ("models", "network", "limits", "lifecycle", "security", "observability")

Parse = Callable[[str], Any]


class SettingError(ValueError):
    """A flag or LOCKGATE_* value that is not allowed; the message says which and why."""


@dataclass(frozen=True)
class Alternative:
    """Another flag that sets the same setting in another form (e.g. Triton's)."""

    flag: str
    parse: Parse
    metavar: str
    help: str


@dataclass(frozen=True)
class Setting:
    """How one ServerConfig field is given: its flag, parser and help."""

    help: str
    group: str
    parse: Parse
    #: Flag name without dashes; default: the field name with '-' for '_'.
    flag: str = ""
    aliases: tuple[str, ...] = ()
    metavar: str | None = None
    #: Shown in --help where the default is not a plain value.
    shown_default: str | None = None
    #: --flag X --flag Y (a list); the environment takes "X,Y".
    repeatable: bool = False
    boolean: bool = False
    #: Accepted values, for --help completion and error messages.
    choices: tuple[str, ...] = ()
    also: tuple[Alternative, ...] = ()


def setting(
    default: Any,
    help: str,
    group: str,
    parse: Parse | None = None,
    **options: Any,
) -> Any:
    """A ServerConfig field that is also a flag and an environment variable."""
    assert group in GROUPS, group
    if parse is None:
        parse = _parser_for(default, options)
    meta = {"setting": Setting(help=help, group=group, parse=parse, **options)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _parser_for(default: Any, options: Mapping[str, Any]) -> Parse:
    if options.get("boolean"):
        return boolean
    if options.get("choices"):
        return choice(*options["choices"])
    if options.get("repeatable"):
        return text
    if isinstance(default, bool):
        raise TypeError("declare boolean settings with boolean=True")
    if isinstance(default, int):
        return non_negative_int
    if isinstance(default, float):
        return non_negative_float
    return text


# --- parsers: text -> value, ValueError saying what is allowed ------------------------------


def text(value: str) -> str:
    return value


def boolean(value: str) -> bool:
    word = value.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false (also 1/0, yes/no, on/off)")


def choice(*allowed: str) -> Parse:
    def parse(value: str) -> str:
        word = value.strip().lower()
        if word not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return word

    return parse


def non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError("expected a whole number >= 0") from None
    if number < 0:
        raise ValueError("expected a whole number >= 0")
    return number


def positive_int(value: str) -> int:
    number = non_negative_int(value)
    if number == 0:
        raise ValueError("expected a whole number >= 1")
    return number


def port(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise ValueError("expected a port number 0-65535 (0: any free port)")
    return number


def non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError("expected a number >= 0") from None
    if not 0 <= number < float("inf"):
        raise ValueError("expected a number >= 0")
    return number


def ratio(value: str) -> float:
    number = non_negative_float(value)
    if number > 1:
        raise ValueError("expected a fraction from 0 to 1")
    return number


def seconds_or_off(value: str) -> float | None:
    """Seconds; 0 or empty turns the feature off (None)."""
    if value.strip() in ("", "0"):
        return None
    return non_negative_float(value) or None


# --- flags and environment -----------------------------------------------------------------


def declared(config_type: type) -> list[tuple[dataclasses.Field[Any], Setting]]:
    """The fields of ``config_type`` that are settings, in declaration order."""
    return [
        (f, f.metadata["setting"])
        for f in dataclasses.fields(config_type)
        if "setting" in f.metadata
    ]


def flag_of(field: dataclasses.Field[Any], spec: Setting) -> str:
    return "--" + (spec.flag or field.name.replace("_", "-"))


def env_of(field: dataclasses.Field[Any], spec: Setting) -> str:
    return ENV_PREFIX + flag_of(field, spec).removeprefix("--").upper().replace("-", "_")


def add_flags(parser: argparse.ArgumentParser, config_type: type) -> None:
    """One flag per setting, grouped; none has an argparse default (see ``resolve``)."""
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for field, spec in declared(config_type):
        group: Any = groups[spec.group]
        if spec.also:
            group = group.add_mutually_exclusive_group()
        flag = flag_of(field, spec)
        kwargs: dict[str, Any] = {
            "dest": field.name,
            "default": argparse.SUPPRESS,
            "help": _help(field, spec),
        }
        if spec.boolean:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _argparse_type(spec.parse)
            kwargs["metavar"] = spec.metavar or (
                "{" + ",".join(spec.choices) + "}" if spec.choices else None
            )
            if spec.repeatable:
                kwargs["action"] = "append"
        group.add_argument(flag, *spec.aliases, **kwargs)
        for other in spec.also:
            group.add_argument(
                other.flag,
                dest=field.name,
                default=argparse.SUPPRESS,
                type=_argparse_type(other.parse),
                metavar=other.metavar,
                help=f"{other.help} (default: unset)".replace("%", "%%"),
            )


def resolve(
    config_type: type,
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Each setting's value: its flag if given, else LOCKGATE_*, else its default.

    Raises SettingError naming the environment variable of a bad value.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field, spec in declared(config_type):
        if hasattr(args, field.name):
            values[field.name] = getattr(args, field.name)
            continue
        name = env_of(field, spec)
        raw = environ.get(name)
        if raw is None:
            continue
        try:
            values[field.name] = _from_env(spec, raw)
        except ValueError as exc:
            raise SettingError(f"{name}={raw!r} is not allowed: {exc}") from None
    return values


def _from_env(spec: Setting, raw: str) -> Any:
    if spec.repeatable:
        return [spec.parse(part) for part in raw.replace(",", " ").split() if part]
    return spec.parse(raw)


def _argparse_type(parse: Parse) -> Parse:
    def checked(value: str) -> Any:
        try:
            return parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{value!r}: {exc}") from None

    checked.__name__ = getattr(parse, "__name__", "value")
    return checked


def _help(field: dataclasses.Field[Any], spec: Setting) -> str:
    if spec.shown_default is not None:
        shown = spec.shown_default
    elif field.default is dataclasses.MISSING:
        shown = "none"
    elif spec.boolean:
        shown = "on" if field.default else "off"
    elif field.default is None or field.default == "":
        shown = "unset"
    elif isinstance(field.default, tuple):
        shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in field.default)
    else:
        shown = str(field.default)
    # argparse formats help with %: a literal % must be doubled.
    return f"{spec.help} (default: {shown}; env {env_of(field, spec)})".replace("%", "%%")


def environment_names(config_type: type) -> Sequence[str]:
    """Every LOCKGATE_* variable the server reads."""
    return [env_of(field, spec) for field, spec in declared(config_type)]
