"""The one exception type that reaches users as a clear message instead of a traceback."""


class GPTFTError(ValueError):
    """A user-facing error: bad input (file, config, CLI argument) or an unavailable resource.

    The command-line entry points print its message on one line and exit with status 2.
    The message names the file, line, record or field at fault.
    """
