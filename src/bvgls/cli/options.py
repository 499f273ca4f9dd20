"""Every command-line option declared once.

A training or data option is a field of the runner's config dataclasses
(:class:`~bvgls.runner.config.FinetuneConfig`, :class:`~bvgls.runner.config.DataOptions`) and
appears, generated from it, in every command that takes it; the options that are no config field
but several commands share (``--model``, ``--data``) are declared in
:data:`SHARED`. Each has one flag, one help and one default in every command.

Typer reads a command's options from its signature; :func:`command` builds that signature
from the command's own parameters plus one ``typer.Option`` per config field, and sets it as
``__signature__`` of a function taking ``**values``, which the command's ``parse`` turns into
typed objects (:func:`typed`, :func:`make_config`): a command function never indexes the values.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import typer

from ..runner.config import MODEL_AND_DATA, TRAINING, SettingError, cli_fields

KW = inspect.Parameter.KEYWORD_ONLY


def param(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    """One command parameter (``annotation``: ``Annotated[type, typer.Option(...)]``)."""
    return inspect.Parameter(name, KW, default=default, annotation=annotation)


def opt(*flags: str, panel: str = TRAINING, **kwargs) -> Any:
    """A command's own ``typer.Option`` in the help panel ``panel``."""
    return typer.Option(*flags, rich_help_panel=panel, **kwargs)


def _cli_type(hint: Any, choices: Sequence[str] | None) -> Any:
    if choices:
        return Literal[tuple(choices)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        concrete = [a for a in args if isinstance(a, type)]
        base = concrete[0] if concrete else str
        return base | None if type(None) in typing.get_args(hint) and base is not str else base
    return hint


def field_flags(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)


def field_param(cls: type, f: dataclasses.Field) -> inspect.Parameter:
    """The typer option of one field of the dataclass ``cls`` (flags, help, panel and choices from
    the field's metadata; default: its ``cli_default`` or default). Its bounds are not given to
    typer: the dataclass checks them when the command builds it (:func:`make_config`), so the
    command line and the Python API refuse the same values with the same words."""
    meta = f.metadata
    default = meta["cli_default"] if meta["cli_default"] is not dataclasses.MISSING else f.default
    if default is None and meta["choices"] and "none" in meta["choices"]:
        default = "none"
    option = typer.Option(*field_flags(f), help=meta["help"], rich_help_panel=meta["panel"])
    hint = typing.get_type_hints(cls)[f.name]
    return param(f.name, Annotated[_cli_type(hint, meta["choices"]), option], default)


def field_params(
    cls: type, names: Sequence[str] | None = None, *, without: Sequence[str] = ()
) -> list[inspect.Parameter]:
    """One typer option per CLI field of ``cls`` (or per field named in ``names``), less ``without``."""
    fields = cli_fields(cls, without) if names is None else [f for f in dataclasses.fields(cls) if f.name in names]
    return [field_param(cls, f) for f in fields]


def option_name(cls: type, name: str) -> str:
    """The command-line flag of the field ``name`` (``--lr``, ``--workers``, ...)."""
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    return "--" + name.replace("_", "-") if f is None else field_flags(f)[0].split("/")[0]


def make_config(cls: type, values: dict[str, Any], **overrides: Any) -> Any:
    """``cls`` from the command's values; a number out of range is reported with its flag."""
    from . import CLIError

    try:
        return cls(**{**split_values(values, cls), **overrides})
    except SettingError as e:
        raise CLIError(e.for_option(option_name(cls, e.name))) from None


def command(
    app: typer.Typer,
    own: Sequence[inspect.Parameter],
    *configs: type,
    parse: Callable[[dict[str, Any]], tuple],
    name: str | None = None,
    without: Sequence[str] = (),
    **command_kwargs,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as a command whose options are ``own`` then those of ``configs`` (less the
    fields named in ``without``: the command sets them itself). Typer passes the options' values
    to ``parse``, which returns ``fn``'s typed arguments (its own options' dataclass and the
    configs); a value it refuses ends the command with one ``error:`` line."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        from . import user_errors

        def run(**values: Any) -> Any:
            with user_errors():
                arguments = parse(values)
            return fn(*arguments)

        run.__name__, run.__qualname__, run.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        run.__module__ = fn.__module__
        params = list(own) + [p for cls in configs for p in field_params(cls, without=without)]
        run.__signature__ = inspect.Signature(params)
        app.command(name, **command_kwargs)(run)
        return fn

    return deco


def typed(cls: type, values: dict[str, Any]) -> Any:
    """The dataclass ``cls`` of a command's own options, from its values."""
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


def split_values(values: dict[str, Any], cls: type) -> dict[str, Any]:
    """The entries of ``values`` that are fields of the dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


MODEL_HELP = (
    "Registered name (see `bvgls list`), timm:<name>, or a model file (a bvgls model.pt, or a pickled "
    "nn.Module with --trust-pickle)."
)
DATA_HELP = (
    "Registered dataset (see `bvgls list`) or an ImageFolder root with train/ and test/ (or val/); "
    "compare takes several, comma-separated."
)

#: the options several commands share that are no config field, each declared once
SHARED: dict[str, inspect.Parameter] = {
    "model": param("model", Annotated[str | None, opt("--model", "-m", panel=MODEL_AND_DATA, help=MODEL_HELP)], None),
    "data": param("data", Annotated[str | None, opt("--data", "-d", panel=MODEL_AND_DATA, help=DATA_HELP)], None),
}


def require(values: dict[str, Any], *names: str) -> None:
    """CLIError naming the first of the shared options ``names`` that was not given."""
    from . import CLIError

    for name in names:
        if values.get(name) is None:
            raise CLIError(f"--{name} is required")
