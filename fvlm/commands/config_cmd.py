"""``fvlm config show NAME``: the resolved config of a command, with every key documented."""
from __future__ import annotations

import argparse

from ..cli import available_commands
from ..config import describe, load_config, to_dict
from ..errors import FvlmError

HELP = "show a command's resolved config: every key, its type, default and meaning"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sub.add_parser("show", help="print the config reference (and resolved values) of a command")
    s.add_argument("name", help="command whose config to show (e.g. preprocess, pretrain)")
    s.add_argument("--config", action="append", metavar="FILE.yaml", help="config file(s) to resolve")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key")
    s.add_argument("--yaml", action="store_true", help="print only the resolved YAML")


def schemas() -> dict:
    return {n: m for n, m in available_commands().items() if hasattr(m, "SCHEMA")}


def run(args) -> int:
    import difflib

    import yaml

    table = schemas()
    if args.name not in table:
        close = difflib.get_close_matches(args.name, list(table), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise FvlmError(f"no config named '{args.name}'{hint} (known: {', '.join(sorted(table))})")
    mod = table[args.name]
    cfg = load_config(mod.SCHEMA, files=args.config or [], sets=args.set or [],
                      base=getattr(mod, "DEFAULT_CONFIG", None))
    resolved = to_dict(cfg)
    if args.yaml:
        print(yaml.safe_dump(resolved, sort_keys=False), end="")
        return 0

    def lookup(key):
        cur = resolved
        for part in key.split("."):
            cur = cur[part]
        return cur

    print(f"# config '{args.name}' (schema {mod.SCHEMA.__name__}; defaults from "
          f"{getattr(mod, 'DEFAULT_CONFIG', None) or 'the schema'})")
    rows = describe(mod.SCHEMA)
    kw = max(len(r[0]) for r in rows)
    for key, tp, default, meaning in rows:
        if tp == "section":
            print(f"\n[{key}]  {meaning}")
            continue
        value = lookup(key)
        print(f"{key:<{kw}}  {tp:<18} value={value!r:<18} default={default!r:<14} {meaning}")
    return 0
