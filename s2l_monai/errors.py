"""User-facing errors and how they are shown: one short message, no traceback.

A bundle run (``python -m monai.bundle run ...``) evaluates our code inside MONAI's config parser and Ignite's
engine; an exception raised there reaches the user wrapped two or three times ("Failed to evaluate ...",
StatsHandler's ``Exception:`` log) with hundreds of lines of traceback before the message. Errors that describe
the user's input or a numerical failure are :class:`S2LError`; :func:`short_errors` (the first statement of the
configs' run lists) makes the interpreter print only their message. Set ``S2L_DEBUG=1`` for the full traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from types import TracebackType

__all__ = ["DEBUG_ENV", "ConfigError", "DataError", "NonFiniteLossError", "S2LError", "find_user_error", "short_errors"]

#: Environment variable that keeps the full tracebacks (any value but ``""``/``0``).
DEBUG_ENV = "S2L_DEBUG"


class S2LError(Exception):
    """An error whose message is complete for a user (what is wrong, which file, what to do)."""


class DataError(S2LError, ValueError):
    """Problems found in the input data, one line each, every line naming its file.

    Args:
        problems: the problems, one per entry.
        what: what was checked, e.g. ``"training data /data/datalist.json"``.
    """

    def __init__(self, problems: Sequence[str], what: str = "the data") -> None:
        self.problems = list(problems)
        self.what = what
        lines = "\n  - ".join(self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {what}:\n  - {lines}")


class ConfigError(S2LError, ValueError):
    """A config key with a value the run cannot use (the message names the key and the accepted values)."""


class NonFiniteLossError(S2LError, FloatingPointError):
    """The training loss became NaN or infinite; the message names the batch's items."""


def debug_enabled() -> bool:
    """Whether ``S2L_DEBUG`` asks for full tracebacks."""
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "no")


def find_user_error(exc: BaseException | None) -> S2LError | None:
    """The first :class:`S2LError` in an exception's chain (``__cause__`` / ``__context__``), or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, S2LError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class _DropUserErrorTracebacks(logging.Filter):
    """Logging filter: drop records that carry an :class:`S2LError` traceback (it is printed once at exit)."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = record.exc_info
        if info and isinstance(info, tuple) and find_user_error(info[1]) is not None:
            return False
        # Ignite logs "Engine run is terminating due to exception: <message>" inside its except block
        return not (record.levelno >= logging.ERROR and find_user_error(sys.exc_info()[1]) is not None)


_FILTER = _DropUserErrorTracebacks()
_INSTALLED = False


def _hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    user = find_user_error(exc)
    if user is None or debug_enabled():
        sys.__excepthook__(exc_type, exc, tb)
        return
    print(f"error: {user}\n(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)


def short_errors() -> None:
    """Show :class:`S2LError` as its message alone when it ends the program (idempotent).

    Installs a ``sys.excepthook`` and a filter in front of every logging handler: MONAI's ``StatsHandler`` logs
    every engine exception with its traceback before re-raising it and Ignite logs its message again; for an
    :class:`S2LError` both are dropped and the message is printed once, at exit. Other exceptions keep their
    tracebacks. Meant for command-line processes (a bundle run), not for library use.
    """
    global _INSTALLED
    if debug_enabled() or _INSTALLED:
        return
    sys.excepthook = _hook
    # every handler, including the stream handlers MONAI's and Ignite's named loggers create later
    original = logging.Handler.handle

    def handle(self: logging.Handler, record: logging.LogRecord) -> bool:
        if not _FILTER.filter(record):
            return False
        return original(self, record)

    logging.Handler.handle = handle  # type: ignore[method-assign]
    _INSTALLED = True
