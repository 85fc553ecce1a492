"""The one exception type for mistakes a user can make (bad paths, values, checkpoints)."""
import traceback
from typing import Callable, NoReturn, Optional, TypeVar

T = TypeVar("T")


class UserInputError(ValueError):
    """A value the user gave cannot be used. The message is one sentence naming the value and what
    was expected; entry points print it without a traceback."""


def one_line(exc: BaseException) -> str:
    """The user-facing sentence of a UserInputError, also when a DataLoader worker re-raised it with
    the worker's traceback folded into the message."""
    text = str(exc).strip()
    last = text.splitlines()[-1] if text else type(exc).__name__
    marker = "UserInputError: "
    return last.split(marker, 1)[1] if marker in last else last


def stop(exc: UserInputError) -> NoReturn:
    """End the process with ``error: <sentence>`` on stderr and exit code 2, without a traceback."""
    import sys

    print(f"error: {one_line(exc)}", file=sys.stderr)
    sys.exit(2)


def run_cli(main: Callable[[], T], log: Optional[Callable[[str], None]] = None) -> T:
    """Run a command-line entry point and return what it returns: a UserInputError ends it with
    ``error: <sentence>`` on stderr and exit code 2, without a traceback. ``log``, when given, also
    receives that line, or the traceback of any other exception (which then propagates), so a log
    file says why its run stopped."""
    try:
        return main()
    except UserInputError as exc:
        if log is not None:
            log(f"error: {one_line(exc)}")
        stop(exc)
    except Exception:
        if log is not None:
            log(traceback.format_exc())
        raise
