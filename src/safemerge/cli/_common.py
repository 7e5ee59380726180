"""Shared CLI plumbing: one way to print results and one way to turn a user error into an exit."""

from __future__ import annotations

import errno
import json
import sys
import warnings
from contextlib import contextmanager
from typing import Annotated, Any, Iterator

import typer
from rich.console import Console
from rich.markup import escape

IgnoreUnknown = Annotated[bool, typer.Option(help="Leave out config keys and method parameters safemerge does not know, "
                                                  "with a warning, as mergekit ignores them (default: an error).")]

# the results store option of the commands that read or write stored evaluations (eval, card, publish)
StoreOpt = typer.Option(None, "--store", help="Results store (default: $SAFEMERGE_HOME/results.sqlite or ./.safemerge/).")

console = Console(stderr=True, soft_wrap=True)  # messages: never broken at the terminal's width (paths stay whole)
out = Console()


class UserError(Exception):
    """A problem with the user's input: printed as one clear message, exit code 2, no traceback."""


@contextmanager
def user_errors(interrupted: str = "") -> Iterator[None]:
    """Print SafemergeError/UserError (and Ctrl-C, or SIGTERM: `kill` ends a command as Ctrl-C does) as one line and
    exit non-zero; warnings as one line each. `interrupted`: what else to say after an interrupt."""
    from safemerge._signals import sigterm_to_interrupt
    from safemerge.errors import SafemergeError

    restore = sigterm_to_interrupt()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            yield
    except (SafemergeError, UserError) as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)  # the message is text, never markup
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print(f"[bold red]interrupted[/]: nothing was written at the target path{escape(interrupted)}", highlight=False)
        raise typer.Exit(130) from None
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        console.print(f"[bold red]error:[/] {escape(where + (e.strerror or str(e)))} (the machine refused: check the folder's "
                      "permissions and the free space, then run the command again)", highlight=False)
        raise typer.Exit(2) from None
    finally:
        restore()


# what the machine refuses, not a bug: permissions, a read-only or full disk, a quota
_ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def _show_warning(message, *args, **kwargs) -> None:
    console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)


@contextmanager
def loading_models(interrupted: str = "") -> Iterator[None]:
    """user_errors for commands that load models: also no transformers progress bar per model load."""
    from safemerge._hf import quiet_transformers

    with user_errors(interrupted), quiet_transformers():
        yield


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
