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


def check_format(doc, name: str, version: int, where) -> dict:
    """Check a loaded document's ``format`` and ``version`` fields; return it or raise :class:`FormatError`."""
    found = doc.get("format") if isinstance(doc, dict) else None
    if found != name:
        raise FormatError(f"{where}: not a {name} file (format: {found!r})")
    if doc.get("version") != version:
        raise FormatError(f"{where}: {name} version {doc.get('version')!r} is not supported "
                          f"(this fvlm reads version {version})")
    return doc
