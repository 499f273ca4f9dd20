"""The ``bvgls`` command line: finetune, compare, plot, groups, list, recommend.

Built on typer (help rendered by rich). The commands live in :mod:`.train` (finetune,
compare), :mod:`.info` (plot, groups, list) and :mod:`.recommend` (recommend); the options are generated
from the runner's config dataclasses (:mod:`.options`). This package imports the runner, never
the reverse.

Other packages extend the command line, and the model, dataset and strategy registries,
through one route: a module named in the ``bvgls.plugins`` entry point group of their
distribution, e.g. in its ``pyproject.toml``::

    [project.entry-points."bvgls.plugins"]
    mypkg = "mypkg.bvgls_plugin"

:func:`main` imports those modules (:func:`load_plugins`) before parsing the command line, so
they can register models (``bvgls.registry.MODELS``), datasets, strategies, or commands
(``@bvgls.cli.app.command()``). Tests call ``typer.testing.CliRunner().invoke(get_app(), [...])``.

Bad input (unknown names, missing data, a strategy that does not fit the model) ends with a
one-line ``error: ...`` and exit code 2; set ``BVGLS_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

import typer

#: the entry point group through which other packages add models, datasets, strategies and commands
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
    callback=lambda: configure_logging(),
)

_plugins_loaded = False


def load_plugins() -> None:
    """Register the library's models and datasets (the runner) and import every module of the
    ``bvgls.plugins`` entry point group (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    from .. import runner  # noqa: F401  (the library's models and datasets)

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


class StdoutHandler(logging.StreamHandler):
    """Log records as plain lines on the current ``sys.stdout`` (looked up at each record, so a
    test runner that swaps ``sys.stdout`` sees them)."""

    def __init__(self):
        super().__init__(sys.stdout)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def configure_logging(*names: str, level: int = logging.INFO) -> None:
    """Show the progress lines of the loggers ``names`` (default: the library's, ``bvgls``) on
    stdout: the library only logs, the command line decides where the lines go. Idempotent."""
    for name in names or ("bvgls",):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(h, StdoutHandler) for h in logger.handlers):
            logger.addHandler(StdoutHandler())


def get_app() -> typer.Typer:
    """The app with every plugin's commands attached."""
    load_plugins()
    return with_paragraph_help(app)


def with_paragraph_help(typer_app: typer.Typer) -> typer.Typer:
    """Give every command whose help comes from its docstring that help with the source's line
    breaks joined within each paragraph: typer's rich help keeps single line breaks, and the
    docstrings are wrapped at the source's line length, not the terminal's."""
    import inspect

    for command_info in typer_app.registered_commands:
        callback = command_info.callback
        if command_info.help is None and callback is not None and callback.__doc__:
            paragraphs = inspect.getdoc(callback).split("\n\n")
            command_info.help = "\n\n".join(" ".join(p.split()) for p in paragraphs)
    return typer_app


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


from . import info, recommend, train  # noqa: E402,F401  (register the commands)
