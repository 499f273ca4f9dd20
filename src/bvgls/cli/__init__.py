"""The ``bvgls`` command line: finetune, compare, plot, groups, list.

Built on typer (help rendered by rich). The commands live in :mod:`.train` (finetune,
compare), :mod:`.info` (plot, groups, list) and :mod:`.bench` (pretrain, export-task, bench,
demo); the training options are generated from :class:`bvgls.runner.config.FinetuneConfig`
(:mod:`.options`). This package imports the runner and the benchmark, never the reverse.
Adding commands from another module::

    # src/bvgls/mymodule.py
    from bvgls.cli import app

    @app.command()
    def mycommand(...): ...

and list the module in :data:`PLUGIN_MODULES` (or expose it through the ``bvgls.plugins``
entry-point group, or name it in the ``BVGLS_PLUGINS`` environment variable, comma
separated). :func:`main` imports those modules before parsing the command line, so they can
register commands, models (``bvgls.registry.MODELS``), datasets and strategies. Tests call
``typer.testing.CliRunner().invoke(get_app(), [...])``.

Bad input (unknown names, missing data, a strategy that does not fit the model) ends with a
one-line ``error: ...`` and exit code 2; set ``BVGLS_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from contextlib import contextmanager

import typer

#: modules imported before the command line is parsed; they may add commands to ``app`` and
#: entries to the model / dataset / strategy registries. Missing optional ones are skipped.
PLUGIN_MODULES: list[str] = ["bvgls.runner.models", "bvgls.runner.data"]
OPTIONAL_PLUGIN_MODULES: list[str] = []
ENTRY_POINT_GROUP = "bvgls.plugins"

app = typer.Typer(
    name="bvgls",
    help="BVG-LS finetuning: update, at every step, the layer group whose gradient has the largest "
         "bias-variance ratio; compare it against full, partial and linear finetuning.",
    epilog="Examples: bvgls finetune --model resnet50 --data pets --download --epochs 50 --lr 0.01 --out runs/pets  "
           "|  bvgls compare --model tiny-resnet --weights none --data digits --strategies full,bvgls --epochs 3 "
           "--out cmp  |  bvgls plot runs/pets. Set BVGLS_DEBUG=1 for tracebacks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)

_plugins_loaded = False


def load_plugins() -> None:
    """Import :data:`PLUGIN_MODULES`, present :data:`OPTIONAL_PLUGIN_MODULES`, ``BVGLS_PLUGINS``
    and the ``bvgls.plugins`` entry points (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for name in PLUGIN_MODULES:
        importlib.import_module(name)
    for name in OPTIONAL_PLUGIN_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    for name in filter(None, (s.strip() for s in os.environ.get("BVGLS_PLUGINS", "").split(","))):
        importlib.import_module(name)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def get_app() -> typer.Typer:
    """The app with every plugin's commands attached."""
    load_plugins()
    return app


def main() -> None:
    """Console-script entry point (``bvgls``)."""
    import warnings

    warnings.formatwarning = one_line_warning
    get_app()(prog_name="bvgls")


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line as one ``warning: ...`` line (like ``error: ...``)."""
    return f"warning: {' '.join(str(message).split())}\n"


# ---------------------------------------------------------------------- helpers
class CLIError(Exception):
    """Raised by commands for bad input; printed as one line."""


@contextmanager
def user_errors():
    """Turn errors caused by the user's input into ``error: <message>`` and exit code 2; a failed
    command removes the output directories it created that are still empty."""
    try:
        with _translated_errors():
            yield
    except BaseException as e:
        if not isinstance(e, typer.Exit) or e.exit_code not in (0, None):
            from ..runner.rundir import remove_empty_created_dirs
            remove_empty_created_dirs()
        raise


@contextmanager
def _translated_errors():
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except (CLIError, ValueError, KeyError, FileNotFoundError, NotADirectoryError, ImportError) as e:
        if os.environ.get("BVGLS_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        typer.echo(f"error: {' '.join(str(msg).split())}", err=True)
        raise typer.Exit(2) from None
    except OSError as e:  # a file or directory the user named (exists, read-only, ...)
        if os.environ.get("BVGLS_DEBUG") or e.filename is None:
            raise
        typer.echo(f"error: {e.filename}: {e.strerror}", err=True)
        raise typer.Exit(2) from None


def numbers(text: str, what: str, kind: type = float) -> list:
    """Comma-separated numbers of ``kind`` (``--lrs``: float, ``--seeds``: int)."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise CLIError(f"{what} must be comma-separated {noun}, got {text!r}") from None
    if not values:
        raise CLIError(f"{what} is empty")
    return values


def console():
    from rich.console import Console
    return Console(stderr=False, highlight=False, soft_wrap=True)


def check_tensorboard() -> None:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise CLIError("--tensorboard needs the tensorboard package: pip install tensorboard") from None


from . import train, info, bench, probe  # noqa: E402,F401  (register the commands)
