"""User-facing errors.

Anything raised as :class:`FvlmError` is printed by the CLI as one line
(``fvlm <command>: error: <message>``) with a non-zero exit code, never as a
traceback. Raise it wherever the cause is the user's input (a file, a flag, a
config key), with a message that says what to change.
"""


#: exit codes of every ``fvlm`` command (README, "Exit codes")
EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_CASES_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class FvlmError(Exception):
    """An error caused by user input; the message is shown as-is (exit code 2)."""

    exit_code = EXIT_INPUT

    def __init__(self, *args):
        # raised in a DataLoader worker, torch re-raises it in the main process as
        # ``type(e)("Caught X in DataLoader worker ...\nOriginal Traceback ...")``: keep the one line
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught ") \
                and "\nOriginal Traceback" in args[0]:
            args = (_original_message(args[0], type(self)),)
        super().__init__(*args)


def _original_message(text: str, cls: type) -> str:
    """The message of the last ``module.Class: message`` line of a formatted traceback."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        head, sep, msg = ln.partition(": ")
        if sep and head.rsplit(".", 1)[-1] == cls.__name__:
            return msg
    return lines[0] if lines else text


class CasesFailedError(FvlmError):
    """The job ran, but too many of its cases failed (or none landed); exit code 3.

    Everything that succeeded is kept; the message says where the failures are recorded.
    """

    exit_code = EXIT_CASES_FAILED


class ConfigError(FvlmError):
    """A config file or ``--set`` override is invalid."""


class FormatError(FvlmError):
    """A file exchanged between stages has the wrong format or schema version."""


def check_format(doc, name: str, version: int, where, *, what: str | None = None, format_hint: str = "",
                 version_hint: str = "") -> dict:
    """Check a loaded document's ``format`` and ``version`` fields; return it or raise :class:`FormatError`.

    The one check of every versioned file fvlm reads. ``what`` names the expected file in the
    wrong-format message (default ``"a <name> file"``); ``format_hint`` and ``version_hint`` end
    the wrong-format and wrong-version messages (what to do about it).
    """
    found = doc.get("format") if isinstance(doc, dict) else None
    if found != name:
        raise FormatError(f"{where}: not {what or f'a {name} file'} (format: {found!r}){format_hint}")
    if doc.get("version") != version:
        raise FormatError(f"{where}: {name} version {doc.get('version')!r} is not supported "
                          f"(this fvlm reads version {version}){version_hint}")
    return doc
