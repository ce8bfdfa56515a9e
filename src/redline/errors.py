"""The errors redline reports as bad input: one sentence, exit code 2, no traceback.

Every module raises its own subclass (ConfigError, TaskError, PrecisionError, ...), so a
Python caller can catch exactly what it expects, and the CLI catches `UserError` alone.
Anything else, in particular an exception raised by the user's own code (a task, a
callback, a sink), is not bad input: it keeps its traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class UserError(ValueError):
    """Bad input: the message is one sentence naming what is wrong and how to fix it."""


class ConfigError(UserError):
    """A configuration key, value or file is wrong; the message says which and how to fix it."""


class MissingExtra(UserError, ImportError):
    """An optional package that a feature needs is not installed; the message names the extra.

    It is an ImportError too, so code that guards an optional import keeps working.
    """

    def __init__(self, feature: str, package: str, extra: str) -> None:
        super().__init__(f"{feature} needs {package}: pip install 'redline[{extra}]'")
        self.package, self.extra = package, extra


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    """Raise ConfigError("{key} must be {allowed}, got {value!r}") unless `ok`."""
    if not ok:
        raise ConfigError(f"{key} must be {allowed}, got {value!r}")


class StorageError(Exception):
    """A file redline writes could not be written (read-only, disk full, permissions).

    Not bad input: the CLI prints the one sentence and exits 1. The message names the
    path and the fault; what was saved before is intact.
    """


@contextlib.contextmanager
def writing(what: str, path: object) -> Iterator[None]:
    """Turn an OSError inside into StorageError("cannot write {what} {path}: {fault}")."""
    try:
        yield
    except OSError as e:
        fault = e.strerror or type(e).__name__
        raise StorageError(f"cannot write {what} {str(path)!r}: {fault}") from e


class RunStopped(Exception):
    """The run stopped itself for a reason its message states in one sentence (e.g.
    non-finite steps under train.on_nonfinite: stop): exit 1, the last good state saved."""
