"""The exception types for bad input and for a run that cannot go on, and the one-line exit."""

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import InstantiationException


class InputError(Exception):
    """A bad config value, data file or output folder, found before any training."""


class Diverged(InputError):
    """The loss became NaN or infinite: the run's own fault, so it is final (never resumed)."""


@contextmanager
def one_line_errors() -> Iterator[None]:
    """A command's bad input ends it with `Error: <what and how to fix it>`, not a traceback."""
    try:
        yield
    except InputError as e:
        sys.exit(f"Error: {e}")


@contextmanager
def config_errors(key: str) -> Iterator[None]:
    """An error raised while building `key` from the config is a bad value there: one line naming
    it, with the library's own reason (PyTorch's and Lightning's say what they expected)."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001  ValueError, TypeError, Lightning's MisconfigurationException, ...
        cause = cause_of(e)
        if isinstance(cause, InputError):
            raise cause from None
        raise InputError(
            f"{key}: {described(cause)}: fix that {key} value (python train.py --help lists them)"
        ) from None


def is_whole(value: object) -> bool:
    """An int and not a bool: to Python True is 1, to a user of `steps=true` it is a mistake."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a float and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name when the message is empty."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def described(error: BaseException) -> str:
    """`Type: the first line of its message`, or the type alone for an empty message."""
    name = type(error).__name__
    return f"{name}: {first_line(error)}" if str(error).strip() else name


def cause_of(error: BaseException) -> BaseException:
    """The error of the object Hydra was building, from inside its InstantiationExceptions."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error
