"""Config loading (each error message) and the CLI entry point."""
import dataclasses
import json
import subprocess
import sys
from typing import Literal, Optional

import pytest
import yaml

from fvlm.cli import main
from fvlm.config import describe, dump_config, load_config, opt
from fvlm.errors import ConfigError


@dataclasses.dataclass
class Optim:
    lr: float = opt(1e-4, "learning rate")
    betas: tuple[float, float] = opt((0.9, 0.95), "Adam betas")


@dataclasses.dataclass
class Schema:
    name: str = opt("run", "run name")
    steps: int = opt(10, "optimizer steps")
    mode: Literal["volume", "crop"] = opt("volume", "pooling mode")
    tags: list[str] = opt([], "free tags")
    out: Optional[str] = opt(None, "output dir")
    optim: Optim = opt(Optim(), "optimizer section")

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("steps: 20\noptim: {lr: 3.0e-4}\n")
    cfg = load_config(Schema, files=[f], sets=["optim.lr=1e-3", "tags=[a, b]", "mode=crop"])
    assert cfg.steps == 20 and cfg.optim.lr == 1e-3 and cfg.tags == ["a", "b"] and cfg.mode == "crop"
    assert cfg.optim.betas == (0.9, 0.95)


def test_base_composition(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 5\nname: base\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nname: child\n")
    cfg = load_config(Schema, files=[tmp_path / "child.yaml"])
    assert (cfg.steps, cfg.name) == (5, "child")


def test_extra_flags_win_over_set():
    cfg = load_config(Schema, sets=["out=a"], extra={"out": "b"})
    assert cfg.out == "b"


@pytest.mark.parametrize("sets,msg", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
    (["stepz=3"], "unknown config key 'stepz'; did you mean 'steps'"),
    (["steps=abc"], "config key 'steps' expects int, got 'abc'"),
    (["optim.lr=fast"], "config key 'optim.lr' expects float"),
    (["mode=volum"], "must be one of 'volume', 'crop', got 'volum'; did you mean 'volume'"),
    (["steps=-1"], "steps must be >= 0"),
    (["optim.betas=[0.9]"], "expects 2 values"),
    (["noequals"], "expects key=value"),
])
def test_config_errors_name_the_key(sets, msg):
    with pytest.raises(ConfigError) as e:
        load_config(Schema, sets=sets)
    assert msg in str(e.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(Schema, files=[tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Schema, files=[bad])
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Schema, files=[lst])


def test_dump_roundtrip_and_describe(tmp_path):
    cfg = load_config(Schema, sets=["steps=7", "optim.lr=0.5"])
    p = dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(Schema, files=[p])
    assert again == cfg
    rows = {r[0]: r for r in describe(Schema)}
    assert rows["optim.lr"][1] == "float" and rows["optim.lr"][3] == "learning rate"
    assert rows["steps"][2] == 10


def test_cli_help_version_info(capsys):
    assert main([]) == 0
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert "fvlm 0.1.0" in capsys.readouterr().out
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"].startswith("2.") and "samples" in info and info["text_model"]


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "fvlm.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "info" in out.stdout and "config" in out.stdout


def test_config_show_unknown_name(capsys):
    assert main(["config", "show", "nonexistent"]) == 2
    assert "no config named 'nonexistent'" in capsys.readouterr().err


def test_config_show_documents_every_key(capsys):
    from fvlm.commands.config_cmd import schemas

    names = sorted(schemas())
    if not names:
        pytest.skip("no command with a config schema is registered yet")
    for name in names:
        assert main(["config", "show", name]) == 0
        out = capsys.readouterr().out
        mod = schemas()[name]
        for key, tp, _, meaning in describe(mod.SCHEMA):
            assert key in out
            assert meaning, f"config key {name}:{key} has no one-line meaning"
        assert main(["config", "show", name, "--yaml"]) == 0
        assert isinstance(yaml.safe_load(capsys.readouterr().out), dict)


def test_a_command_imports_only_its_own_module():
    """`fvlm preprocess` builds the parser of preprocess alone: no torch import (1.5 s of its start-up),
    while `fvlm --help` still lists every command."""
    code = ("import sys\nfrom fvlm import cli\n"
            "p = cli.build_parser(cli._command_in(['--debug', 'preprocess', '--help']))\n"
            "print('torch' in sys.modules, sorted(p._subparsers._group_actions[0].choices))\n"
            "print(sorted(cli.build_parser(cli._command_in(['--help']))._subparsers._group_actions[0].choices))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "False ['preprocess']"
    from fvlm.cli import COMMANDS

    assert out[1] == str(sorted(COMMANDS))
