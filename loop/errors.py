"""The one exception a user can act on. The CLI prints its message on one line; `--debug` adds the traceback."""


class LoopError(Exception):
    """An error the user can fix: the message says what went wrong and what to do."""
