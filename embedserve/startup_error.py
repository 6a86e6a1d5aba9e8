"""Start-up errors of the user's making: a wrong option, model folder or checkpoint.

Their message says what to change, so a child process reports it to the launcher (which logs it on
one line, naming the process) without a traceback; any other exception is a bug and keeps its.
"""

from __future__ import annotations


class StartupError(ValueError):
    """The server cannot start as configured; the message tells the user what to change."""


def one_line(exc: BaseException) -> str:
    """`exc`'s message on one line (hub and tokenizer errors span several), else its type's name."""
    return " ".join(str(exc).split()) or type(exc).__name__
