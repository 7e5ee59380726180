"""Shared CLI plumbing: one way to print results and one way to turn a user error into an exit."""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import warnings
from contextlib import contextmanager
from typing import Annotated, Any, Iterator

import typer
from rich.console import Console
from rich.markup import escape

from safemerge.naming import first_repeat

IgnoreUnknown = Annotated[bool, typer.Option(help="Leave out config keys and method parameters safemerge does not know, "
                                                  "with a warning, as mergekit ignores them (default: an error).")]

# the results store option of the commands that read or write stored evaluations (eval, card, publish)
StoreOpt = typer.Option(None, "--store", help="Results store (default: results.sqlite in $SAFEMERGE_HOME, else in ./.safemerge/).")

console = Console(stderr=True, soft_wrap=True)  # messages: never broken at the terminal's width (paths stay whole)
out = Console()


def split_names(values: list[str], option: str) -> list[str]:
    """A list option of names (--domains, --skip, --knowledge), given comma-separated, repeated or both; a name given
    twice is an error (a typo for another name would otherwise run short of it). Lists of paths or patterns are not
    split: a comma may be part of a file name or a regular expression."""
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    if twice := first_repeat(names):
        raise UserError(f"{option} {twice[0]}: given twice; give each name once")
    return names


class UserError(Exception):
    """A problem with the user's input: printed as one clear message, exit code 2, no traceback."""


def one_of(*given: tuple[str, Any], default: Any = None) -> Any:
    """The value of an option that has a hidden alias (another tool's name for it): the one given, else `default`;
    both given is an error (two values for one option)."""
    named = [(flag, v) for flag, v in given if v is not None]
    if len(named) > 1:
        raise UserError(f"{' and '.join(f for f, _ in named)} are one option; give it once")
    return named[0][1] if named else default


@contextmanager
def user_errors(interrupted: str = "") -> Iterator[None]:
    """Print SafemergeError/UserError (and Ctrl-C, or SIGTERM: `kill` ends a command as Ctrl-C does) as one line and
    exit non-zero; warnings as one line each. `interrupted`: what else to say after an interrupt."""
    from safemerge import _signals
    from safemerge.errors import SafemergeError

    restore = _signals.sigterm_to_interrupt()
    finished_before = len(_signals.finished_outputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            yield
    except (SafemergeError, UserError) as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)  # the message is text, never markup
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print(f"[bold red]interrupted[/]: {escape(_what_was_written(_signals.finished_outputs[finished_before:]))}"
                      f"{escape(interrupted)}", highlight=False)
        raise typer.Exit(130) from None
    except Exception as e:
        refused = _refused(e)
        if refused is None:
            raise
        console.print(f"[bold red]error:[/] {escape(refused)} (the machine refused: check the folder's permissions and the "
                      "free space, then run the command again)", highlight=False)
        raise typer.Exit(2) from None
    finally:
        restore()


def _what_was_written(finished: list[str]) -> str:
    if not finished:
        return "nothing was written at the target path"
    if len(finished) == 1:
        return f"{finished[0]} had been written in full before it; nothing is half-written"
    return f"{len(finished)} outputs had been written in full before it (the last: {finished[-1]}); nothing is half-written"


def _refused(e: Exception) -> str | None:
    """What the machine refused (permissions, a read-only or full disk, a quota) as `[path: ]reason`, or None for any
    other error. safetensors (Rust) reports the OS error only in its message: `I/O error: REASON (os error N)[ at path
    "P"]`; P is its temporary file, so the folder is named."""
    if isinstance(e, OSError):
        if e.errno not in _ENVIRONMENT_ERRNOS:
            return None
        return (f"{e.filename}: " if e.filename else "") + (e.strerror or str(e))
    if type(e).__name__ == "SafetensorError":
        m = re.search(r'I/O error: (.+?) \(os error (\d+)\)(?: at path "(.+)")?', str(e))
        if m and int(m[2]) in _ENVIRONMENT_ERRNOS:
            return (f"{os.path.dirname(m[3])}: " if m[3] else "") + f"{m[1]} (writing safetensors)"
    return None


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
