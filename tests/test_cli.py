from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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


def _failing_group(error: BaseException) -> click.Group:
    """A command line on the shared plumbing whose command ``go`` raises ``error``."""
    from ckascope.cliutils import FriendlyGroup

    @click.group(cls=FriendlyGroup)
    def main() -> None:
        """A group."""

    @main.command()
    def go() -> None:
        raise error

    return main


def _errors() -> dict[str, tuple[BaseException | None, str]]:
    """What a command meets (None: a usage error, ``nope`` is no command), and its words."""
    from ckascope.errors import CKAScopeError, InputError, LocalInputError, WeightsUnavailableError

    offline = "pretrained weights for resnet18 are not cached"

    return {
        "input": (InputError("bad size. Hint: give 32"), "bad size. Hint: give 32"),
        "local": (LocalInputError("no GPU 1. Hint: fewer"), "no GPU 1. Hint: fewer"),
        "usage": (None, "No such command 'nope'"),
        "runtime": (CKAScopeError("loss became NaN"), "loss became NaN"),
        "weights": (WeightsUnavailableError(offline, "--weights none"), offline),
        "file": (PermissionError(13, "Permission denied", "/x/y.pt"), "Permission denied: /x/y.pt"),
        "interrupt": (KeyboardInterrupt(), "interrupted"),
    }


@pytest.mark.parametrize(
    ("kind", "rank", "world", "where", "waits"),
    [
        ("input", "0", "1", "", False),
        ("input", "0", "2", "", False),  # the job's mistake: rank 0 says it for every rank
        ("input", "1", "2", "rank 1: ", True),  # ... where torchrun did not end rank 1 first
        ("local", "0", "2", "rank 0: ", False),  # this rank's alone (its LOCAL_RANK's GPU)
        ("local", "1", "2", "rank 1: ", False),
        ("usage", "0", "2", "", False),
        ("usage", "1", "2", "rank 1: ", True),
        ("weights", "0", "2", "", False),  # offline: every process of the node alike
        ("weights", "1", "2", "rank 1: ", True),
        ("runtime", "0", "1", "", False),
        ("runtime", "0", "2", "rank 0: ", False),  # a rank's own failure, named at once
        ("runtime", "1", "2", "rank 1: ", False),
        ("file", "1", "2", "rank 1: ", False),
        ("interrupt", "0", "2", "", False),
        ("interrupt", "1", "2", None, False),  # every rank was interrupted: rank 0 says it
    ],
)
def test_under_torchrun_an_error_of_the_job_is_shown_once_and_a_rank_s_own_names_it(
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    rank: str,
    world: str,
    where: str | None,
    waits: bool,
) -> None:
    from types import SimpleNamespace

    from ckascope import cliutils

    slept: list[float] = []
    monkeypatch.setattr(cliutils, "time", SimpleNamespace(sleep=slept.append))
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    error, words = _errors()[kind]
    args = ["nope"] if error is None else ["go"]
    result = CliRunner().invoke(_failing_group(error or Exception()), args)
    assert result.exit_code == {"input": 2, "local": 2, "usage": 2, "interrupt": 130}.get(kind, 1)
    lines = [line for line in result.stderr.splitlines() if line]  # click: a newline on Ctrl-C
    assert lines == ([] if where is None else [lines[0]])
    if where is not None:
        assert lines[0].startswith(f"Error: {where}{words}"), lines[0]
        assert "rank" not in lines[0][len(f"Error: {where}") :]
    assert slept == ([cliutils.JOB_ERROR_WAIT] if waits else [])


def _state(pid: int) -> str:
    """The state letter of a process (S: sleeping), from /proc."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_ctrl_c_while_a_rank_waits_to_show_a_mistake_exits_with_its_code_quietly() -> None:
    """torchrun forwards a Ctrl-C to every process: rank 1, waiting for rank 0 to fail, exits."""
    script = (
        "from ckascope.errors import InputError; from tests.test_cli import _failing_group; "
        "group = _failing_group(InputError('bad size')); print('ready', flush=True); group(['go'])"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": "1", "WORLD_SIZE": "2"}
    pipe = subprocess.PIPE
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, env=env, stdout=pipe, stderr=pipe, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    deadline = time.monotonic() + 10
    while _state(proc.pid) != "S" and time.monotonic() < deadline:  # in the wait's sleep
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert (proc.returncode, err) == (2, "")  # the mistake's code, and no traceback


@pytest.mark.parametrize(("rank", "shown"), [("0", True), ("1", False)])
def test_under_torchrun_a_renamed_flag_and_an_early_interrupt_are_said_by_rank_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], rank: str, shown: bool
) -> None:
    """The same arguments and the same Ctrl-C reach every rank: rank 0 says so for the job."""
    from ckascope.cliutils import renamed_flags
    from ckascope.entry import _interrupted

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert renamed_flags(["--sizes=8"], {"--sizes": "--eval-sizes"}) == ["--eval-sizes=8"]
    with pytest.raises(SystemExit) as stopped:
        _interrupted(2, None)  # Ctrl-C before the command line is imported
    assert stopped.value.code == 130
    said = capsys.readouterr().err.splitlines()
    want = ["note: --sizes is now --eval-sizes; the old name goes in the next release"]
    assert said == ([*want, "Error: interrupted"] if shown else [])


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
@pytest.mark.parametrize(
    ("cli", "argv", "words"),
    [
        (
            "msun",
            ["train", "--model", "vgg11", "--method", "vanilla", "--image-size", "28"],
            "vgg11 needs images of at least 32 px",
        ),
        ("ckascope", ["compare", "--model", "resnet18", "--scale", "32"], "--scale"),
    ],
    ids=["msun", "ckascope"],
)
def test_a_mistake_in_the_arguments_under_torchrun_is_said_once(
    tmp_path: Path, cli: str, argv: list[str], words: str
) -> None:
    """Two processes meet it before any process group: rank 0 says it, torchrun ends rank 1."""
    run = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", cli]
    done = _run(*run, *argv, "--out", str(tmp_path / "out"))
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "rank" not in errors[0]
    assert words in errors[0]
    assert not (tmp_path / "out").exists()
