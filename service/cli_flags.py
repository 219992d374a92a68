"""``actserve serve`` flags generated from the ``Settings`` model: one flag per setting, with
its description, default and environment variable in ``--help``, so the flags, the
environment and the documentation cannot drift apart. A setting added to ``Settings`` is a
flag at once.

Values are handed to ``Settings`` as given (strings): pydantic converts and checks them, so
a bad flag and a bad environment variable get the same message naming the setting.
"""

from __future__ import annotations

import argparse
import typing

from pydantic.fields import FieldInfo

from service.settings import Settings

ENV_PREFIX = Settings.model_config.get("env_prefix", "")
NONE = "none"


class _Unset:
    """An explicit ``none`` on the command line (``None`` means "flag not given")."""

    def __repr__(self) -> str:
        return NONE

    __str__ = __repr__


EXPLICIT_NONE = _Unset()


def env_name(name: str) -> str:
    return f"{ENV_PREFIX}{name}".upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choices(annotation) -> tuple[list[str] | None, bool]:
    """(the allowed values of a Literal, whether None is allowed too)."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    inner = [a for a in args if a is not type(None)] if optional else [annotation]
    if len(inner) == 1 and typing.get_origin(inner[0]) is typing.Literal:
        return [str(v) for v in typing.get_args(inner[0])], optional
    return None, optional


def show_default(value) -> str:
    if value is None:
        return NONE
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return '""'
    return str(value)


def _metavar(annotation) -> str:
    for typ, word in ((bool, "BOOL"), (int, "INT"), (float, "FLOAT")):
        if annotation is typ:
            return word
    return "TEXT"


def help_text(name: str, field: FieldInfo) -> str:
    what = (field.description or name.replace("_", " ")).replace("%", "%%")
    return f"{what} (default: {show_default(field.default)}; env {env_name(name)})"


def add_settings_flags(parser: argparse.ArgumentParser, model: type[Settings] = Settings) -> None:
    group = parser.add_argument_group(
        "settings", f"every setting; a flag overrides its {ENV_PREFIX}* environment variable")
    for name, field in model.model_fields.items():
        kwargs: dict = {"dest": name, "default": None, "help": help_text(name, field)}
        if field.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            choices, optional = _choices(field.annotation)
            if choices is not None:
                kwargs["choices"] = [*choices, EXPLICIT_NONE] if optional else choices
                kwargs["metavar"] = "{" + ",".join(map(str, kwargs["choices"])) + "}"
            else:
                kwargs["metavar"] = _metavar(field.annotation)
            if optional:
                kwargs["type"] = lambda v: EXPLICIT_NONE if v == NONE else v
        group.add_argument(flag_name(name), **kwargs)


def overrides(args: argparse.Namespace, model: type[Settings] = Settings) -> dict:
    """The settings given on the command line (``None``: not given)."""
    return {name: getattr(args, name, None) for name in model.model_fields}
