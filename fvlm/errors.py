"""User-facing errors.

Anything raised as :class:`FvlmError` is printed by the CLI as one line
(``fvlm <command>: error: <message>``) with a non-zero exit code, never as a
traceback. Raise it wherever the cause is the user's input (a file, a flag, a
config key), with a message that says what to change.
"""


class FvlmError(Exception):
    """An error caused by user input; the message is shown as-is."""


class ConfigError(FvlmError):
    """A config file or ``--set`` override is invalid."""


class FormatError(FvlmError):
    """A file exchanged between stages has the wrong format or schema version."""
