from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_root_cli_combines_both_groups() -> None:
    done = _run("cli.py", "--help")
    assert done.returncode == 0
    assert "ckascope" in done.stdout
    assert "msun" in done.stdout
    assert "compare" in _run("cli.py", "ckascope", "--help").stdout


def test_module_entry_points_and_unknown_command() -> None:
    assert _run("-m", "ckascope", "--version").stdout.strip() == "ckascope, version 0.1.0"
    assert _run("-m", "msun", "--help").returncode == 0
    bad = _run("-m", "ckascope", "frobnicate")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "Error: No such command 'frobnicate'. (see 'python -m ckascope --help')"
    ]


def test_wheel_installs_the_two_packages_and_no_top_level_cli(tmp_path: Path) -> None:
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("ckascope-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        tops = {
            name.split("/")[0]
            for name in zf.namelist()
            if not name.split("/")[0].endswith(".dist-info")
        }
        entry_points = zf.read(
            next(n for n in zf.namelist() if n.endswith("entry_points.txt"))
        ).decode()
    assert tops == {"ckascope", "msun"}
    assert "ckascope = ckascope.entry:ckascope" in entry_points
    assert "msun = msun.entry:main" in entry_points


def test_models_listing() -> None:
    from ckascope.cli import main

    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0
    assert "resnet50" in result.stdout.split()


def test_help_and_usage_errors_do_not_import_torch() -> None:
    code = (
        "import sys; from click.testing import CliRunner; "
        "import ckascope.cli as c, msun.cli as m; "
        "r = [CliRunner().invoke(g, a) for g, a in ((c.main, ['compare', '--help']), "
        "(m.main, ['train', '--help']), (m.main, ['eval', '--help']), (c.main, ['compare', '--scales', 'x']))]; "
        "print([x.exit_code for x in r], 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[0, 0, 0, 2] False"  # --help answers in a blink


def _generated(name: str) -> tuple[click.Command, type, list[str], set[str]]:
    """A command whose options a config dataclass generates: the command, the dataclass, the
    arguments it needs to parse, and its parameters that are not the dataclass's fields."""
    import ckascope.cli as c
    import msun.cli as m
    from ckascope.config import CompareConfig
    from msun.config import TrainConfig
    from msun.options import EvalConfig, FlopsConfig

    split = {"from_dir", "threshold", "split_points", "as_json"}
    return {
        "compare": (c.compare, CompareConfig, [], set()),
        "suggest-split": (c.suggest_split_command, CompareConfig, [], split),
        "train": (m.train, TrainConfig, [], {"config_file", "resume"}),
        "eval": (m.eval_command, EvalConfig, ["m.pt"], {"checkpoints"}),
        "flops": (m.flops, FlopsConfig, ["--model", "resnet18"], set()),
    }[name]


@pytest.mark.parametrize("name", ["compare", "suggest-split", "train", "eval", "flops"])
def test_every_generated_command_takes_its_config_fields_as_options(name: str) -> None:
    """Names, flags, defaults, choices, ranges and help: a field or option added on one side fails."""
    import dataclasses
    import typing

    command, config, args, extra = _generated(name)
    params = {p.name: p for p in command.params if p.name not in extra}
    fields = {f.name: f for f in dataclasses.fields(config)}
    assert params.keys() == fields.keys()
    parsed = command.make_context(name, list(args)).params
    hints = typing.get_type_hints(config)
    for key, f in fields.items():
        param, meta = params[key], f.metadata
        assert isinstance(param, click.Option)
        assert param.opts[0] == meta.get("option", "--" + key.replace("_", "-"))
        assert param.help == meta["help"]
        if f.default is dataclasses.MISSING:
            assert param.required, key
        else:
            assert parsed[key] == f.default, key
        literal = typing.get_origin(hints[key]) is typing.Literal
        choices = meta.get("choices") or (typing.get_args(hints[key]) if literal else None)
        given = param.type.choices if isinstance(param.type, click.Choice) else None
        assert given == (tuple(choices) if choices else None), key
        ranged = {k: getattr(param.type, k, None) for k in ("min", "max") if k in meta}
        assert ranged == {k: meta[k] for k in ("min", "max") if k in meta}, key


def test_the_commands_set_openmp_to_share_cores_before_torch_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ckascope.entry import SPINCOUNT, share_cores

    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    share_cores()
    assert os.environ["GOMP_SPINCOUNT"] == SPINCOUNT
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    share_cores()
    assert os.environ["GOMP_SPINCOUNT"] == "5"  # the user's setting stays
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    share_cores()
    assert "GOMP_SPINCOUNT" not in os.environ  # a policy of the user's own: left alone
    # the entry module loads no torch, so the setting is in place when the command imports it
    check = "import sys, ckascope.entry, msun.entry; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", check], check=False).returncode == 0
