"""Typer options generated from the runner's config dataclasses, so a training option is
declared once (a :class:`~bvgls.runner.config.FinetuneConfig` field) and appears in every
command that trains.

Typer reads a command's options from its signature; :func:`command` builds that signature
from the command's own parameters plus one ``typer.Option`` per config field, and sets it as
``__signature__`` of a function taking ``**values``.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import typer

from ..runner.config import cli_fields

KW = inspect.Parameter.KEYWORD_ONLY


def param(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    """One command parameter (``annotation``: ``Annotated[type, typer.Option(...)]``)."""
    return inspect.Parameter(name, KW, default=default, annotation=annotation)


def _cli_type(hint: Any, choices: Sequence[str] | None) -> Any:
    if choices:
        return Literal[tuple(choices)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        concrete = [a for a in args if isinstance(a, type)]
        base = concrete[0] if concrete else str
        return base | None if type(None) in typing.get_args(hint) and base is not str else base
    return hint


def field_params(cls: type) -> list[inspect.Parameter]:
    """One typer option per CLI field of the dataclass ``cls`` (flags, help, panel, bounds and
    choices from the field's metadata; default: its ``cli_default`` or default)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in cli_fields(cls):
        meta = f.metadata
        flags = meta["flags"] or ("--" + f.name.replace("_", "-"),)
        default = meta["cli_default"] if meta["cli_default"] is not dataclasses.MISSING else f.default
        if default is None and meta["choices"] and "none" in meta["choices"]:
            default = "none"
        bounds = {k: meta[k] for k in ("min", "max") if meta[k] is not None}
        option = typer.Option(*flags, help=meta["help"], rich_help_panel=meta["panel"], **bounds)
        out.append(param(f.name, Annotated[_cli_type(hints[f.name], meta["choices"]), option], default))
    return out


def command(app: typer.Typer, own: Sequence[inspect.Parameter], *configs: type, name: str | None = None,
            **command_kwargs) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(**values)`` as a command whose options are ``own`` then those of ``configs``."""
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        params = list(own) + [p for cls in configs for p in field_params(cls)]
        fn.__signature__ = inspect.Signature(params)
        app.command(name, **command_kwargs)(fn)
        return fn
    return deco


def split_values(values: dict[str, Any], cls: type) -> dict[str, Any]:
    """The entries of ``values`` that are fields of the dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}
