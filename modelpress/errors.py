"""The one exception type for user mistakes.

A `ModelpressError` carries a message that says what is wrong and what to do; the CLI prints it on
one line and exits with code 2. Anything else that escapes is a bug and keeps its traceback.
"""


class ModelpressError(Exception):
    """A mistake the user can fix (bad path, corrupt file, impossible setting)."""


def one_line(error: BaseException | str) -> str:
    """An error's message on one line (transformers' and torch's run over several)."""
    return " ".join(str(error).split())
