"""The ``fvlm`` command.

Subcommands live in ``fvlm/commands/<name>.py``; adding one is one line in
:data:`COMMANDS` plus that module, which defines:

- ``HELP``: a one-line description;
- ``add_arguments(parser)``: its own flags (use :func:`shorthand` for flags that
  set a config key, so they are applied after ``--set`` and recorded in the
  resolved config);
- ``run(args) -> int``: the work; heavy imports (torch, deepspeed) go inside it so
  that ``fvlm --help`` stays fast;
- optionally ``SCHEMA`` (a config dataclass) and ``DEFAULT_CONFIG`` (its default
  YAML under ``configs/``); then ``--config``/``--set`` are added automatically,
  :func:`resolve_config` builds the config, and ``fvlm config show <name>`` documents it.

Errors caused by input are raised as :class:`fvlm.errors.FvlmError` and printed as
one line; exit code 2 (``e.exit_code``: 3 for :class:`fvlm.errors.CasesFailedError`).
OS errors and undecodable text that a command did not check itself are the same one
line with exit 2; anything else is a bug: one line, exit 1, the traceback with ``--debug``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from .atomic import remove_leftovers
from .config import load_config
from .errors import FvlmError
from .interrupts import check_interrupted, interrupts
from .version import __version__

#: name -> module path. Order is the order in ``fvlm --help``.
COMMANDS: dict[str, str] = {
    "info": "fvlm.commands.info",
    "config": "fvlm.commands.config_cmd",
    "preprocess": "fvlm.commands.preprocess",
    "reports": "fvlm.commands.reports",
    "cache": "fvlm.commands.cache",
    "pretrain": "fvlm.commands.pretrain",
    "zeroshot": "fvlm.commands.zeroshot",
    "compare": "fvlm.commands.compare",
    "predict": "fvlm.commands.predict",
    "embed": "fvlm.commands.embed",
    "export": "fvlm.commands.export",
    "pretrain-xray": "fvlm.commands.pretrain_xray",
    "dense": "fvlm.commands.dense",
    "demo": "fvlm.commands.demo",
}


def available_commands(only: str | None = None) -> dict[str, Any]:
    """Import the command modules that exist (later issues add the rest); ``only``: just that one
    (a command's schema module may import torch: ``fvlm preprocess`` should not pay for it)."""
    mods = {}
    for name, path in COMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            mods[name] = importlib.import_module(path)
        except ModuleNotFoundError as e:
            if e.name == path:  # the module itself is not written yet
                continue
            raise
    return mods


def shorthand(parser: argparse.ArgumentParser, flag: str | tuple[str, ...], key: str, help: str, **kw) -> None:
    """Add a flag (or a tuple of alias flags) that is a shorthand for config key ``key``.

    Shorthands are applied after ``--set`` and recorded in the resolved config like any key.
    """
    dest = "_sh_" + key.replace(".", "__")
    flags = (flag,) if isinstance(flag, str) else tuple(flag)
    if kw.get("action") not in ("store_const", "store_true", "store_false"):
        kw.setdefault("metavar", key.split(".")[-1].upper())
    parser.add_argument(*flags, dest=dest, default=None, help=f"{help} (config key: {key})", **kw)


def _shorthand_overrides(args: argparse.Namespace) -> dict:
    out: dict = {}
    for k, v in vars(args).items():
        if k.startswith("_sh_") and v is not None:
            parts = k[4:].split("__")
            cur = out
            for p in parts[:-1]:
                cur = cur.setdefault(p, {})
            cur[parts[-1]] = v
    return out


def resolve_config(args: argparse.Namespace, schema=None, default_config: str | None = None):
    """Build the command's config: defaults, ``--config`` files, ``--set``, then shorthand flags."""
    mod = getattr(args, "_module", None)
    schema = schema or getattr(mod, "SCHEMA")
    if default_config is None:
        default_config = getattr(mod, "DEFAULT_CONFIG", None)
    return load_config(schema, files=args.config or [], sets=args.set or [], base=default_config,
                       extra=_shorthand_overrides(args))


def add_common(parser: argparse.ArgumentParser, with_config: bool = True) -> None:
    if with_config:
        parser.add_argument("--config", action="append", metavar="FILE.yaml",
                            help="config file(s), merged in order over the defaults")
        parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                            help="override a config key, e.g. --set train.lr=1e-4 (repeatable)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars, warnings only")


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not a top-level flag), if known."""
    for a in argv:
        if a != "--debug":
            return a if a in COMMANDS else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fvlm",
        description="fvlm: fine-grained vision-language pretraining on 3D CT "
                    "(preprocess -> pretrain -> zero-shot evaluation).")
    parser.add_argument("--version", action="version", version=f"fvlm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of any error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in available_commands(only).items():
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.add_arguments(p)
        if not getattr(mod, "NO_COMMON", False):
            add_common(p, with_config=hasattr(mod, "SCHEMA"))
        if not any("--debug" in a.option_strings for a in p._actions):
            # SUPPRESS: `fvlm --debug CMD` is not undone by the subcommand's default
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show the Python traceback of any error")
        p.set_defaults(_module=mod, _name=name)
    return parser


def _os_error_line(e: OSError) -> str:
    """One line for an OS-level failure: what went wrong and on which path."""
    import errno

    what = {errno.ENOENT: "file not found", errno.EACCES: "permission denied", errno.EROFS: "read-only file system",
            errno.ENOSPC: "no space left on device", errno.EEXIST: "already exists",
            errno.EISDIR: "is a directory (a file was expected)",
            errno.ENOTDIR: "not a directory"}.get(e.errno, e.strerror or type(e).__name__)
    paths = [x for x in (e.filename, e.filename2) if x]
    return f"{what}: {' -> '.join(map(str, paths))}" if paths else f"{what}: {e}"


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (README, "Exit codes").

    0 done; 2 bad input, usage or an environment problem (one line on stderr); 3 the job ran
    but too many cases failed; 130 interrupted; 1 a bug (traceback with ``--debug``).
    """
    parser = build_parser(_command_in(sys.argv[1:] if argv is None else list(argv)))
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    from .progress import set_quiet   # tqdm: only once a command runs

    set_quiet(getattr(args, "quiet", False))
    debug = bool(getattr(args, "debug", False)) or os.environ.get("FVLM_DEBUG", "") not in ("", "0")
    name = args._name
    try:
        with interrupts():   # SIGINT and SIGTERM: KeyboardInterrupt wherever they land (fvlm.interrupts)
            rc = args._module.run(args)
            check_interrupted()   # one that a __del__ swallowed
    except FvlmError as e:
        if debug:
            raise
        print(f"fvlm {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if argv is None:   # the process's own command line: it exits now, and a second Ctrl-C must
            import signal  # not cut its clean-up short (a caller of main([...]) keeps its handlers)

            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
        remove_leftovers()   # temporaries whose own clean-up a second signal cut short
        print(f"fvlm {name}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a path a command did not check itself: missing, unreadable, read-only, disk full
        if debug:
            raise
        print(f"fvlm {name}: error: {_os_error_line(e)}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as e:
        if debug:
            raise
        print(f"fvlm {name}: error: an input file is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})",
              file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug: say so in one line, the traceback is behind --debug
        if debug:
            raise
        print(f"fvlm {name}: internal error (a bug, please report it): {type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''} (re-run with --debug for the traceback)", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
