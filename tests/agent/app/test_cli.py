"""The ``chainfed`` command line: every subcommand's help, and bad input answered with one
line and exit status 2, never a traceback.

Help is checked for every entry of ``SUBCOMMANDS``, so a new subcommand is covered
without touching this file. The console script itself runs in a subprocess twice (the
entry point and its exit status); everything else calls ``main`` in-process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chainfed.agent.cli import SUBCOMMANDS, build_parser, main

# small, fast data options for the train command's failure paths
DATA = ["--train-rows", "20", "--val-rows", "10", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


def squeeze(text: str) -> str:
    """Text without whitespace: argparse re-wraps descriptions (even inside hyphenated words)."""
    return "".join(text.split())


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["chainfed", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_console_script_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for name, command in SUBCOMMANDS.items():
        assert name in result.stdout
        assert squeeze(command.summary) in squeeze(result.stdout)


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_help_prints_its_description(name, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: chainfed {name}")
    assert squeeze(SUBCOMMANDS[name].description) in squeeze(out)


def test_every_option_of_every_subcommand_says_what_it_does():
    def options_without_help(parser: argparse.ArgumentParser, path: str) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    missing += options_without_help(sub, f"{path} {name}")
            elif action.option_strings and not (action.help or "").strip():
                missing.append(f"{path} {action.option_strings[0]}")
        return missing

    assert options_without_help(build_parser(), "chainfed") == []


def test_every_subcommand_has_a_summary_and_a_description():
    for name, command in SUBCOMMANDS.items():
        assert command.summary.strip() and "\n" not in command.summary, name
        assert len(command.description) > len(command.summary), name


def test_no_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["convert-gguf", "--help"]])
def test_help_does_not_import_torch(argv):
    """``chainfed --help`` (and a light subcommand's) builds only what it shows."""
    code = "import sys\nfrom chainfed.agent.cli import main\ntry:\n    main(sys.argv[1:])\n"
    code += "except SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)"
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert result.stderr.strip().splitlines()[-1] == "False"


# -- bad input --------------------------------------------------------------------------


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("chainfed ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_train_with_a_missing_model_folder_exits_2_naming_it():
    result = run_cli("train", "--model", "/nonexistent", *DATA)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "/nonexistent")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--window", "0"], ["window must be >= 1, got 0"]),
        (["--micro-batch", "0"], ["micro_batch must be >= 1"]),
        (["--gpo", "exact:0"], ["--gpo must be"]),
        (["--min-rounds", "4", "--max-rounds", "2"], ["min_rounds"]),
        (["--memory-budget", "1KiB"], ["memory budget 1 KiB is too small", "--memory-budget"]),
        (["--eval-only"], ["--eval-only needs --adapters"]),
        (["--data", "/nonexistent.csv"], ["/nonexistent.csv"]),
    ],
    ids=["window-0", "micro-batch-0", "gpo", "rounds", "budget", "eval-only", "data"],
)
def test_train_bad_options_exit_2_with_one_line(tmp_path, capsys, args, fragments):
    status = main(["train", *args, *DATA, "--workdir", str(tmp_path / "w")])
    assert status == 2
    assert_one_line_error(capsys.readouterr().err, *fragments)


@pytest.mark.parametrize(
    "args",
    [["--start-layer", "6"], ["--memory-budget", "lots"]],
    ids=["start-layer", "budget-text"],
)
def test_train_bad_options_that_escape_as_tracebacks(tmp_path, capsys, args):
    status = main(["train", *args, *DATA, "--workdir", str(tmp_path / "w")])
    assert status == 2
    assert_one_line_error(capsys.readouterr().err)


def test_convert_gguf_missing_input_exits_2(tmp_path, capsys):
    status = main(["convert-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "out")])
    assert status == 2
    assert_one_line_error(capsys.readouterr().err, "missing.gguf")
    assert not (tmp_path / "out").exists()


# -- device and precision ---------------------------------------------------------------

DEVICE_COMMANDS = ("train", "agent", "simulate", "demo", "generate", "classify")


@pytest.mark.parametrize("name", DEVICE_COMMANDS)
def test_device_and_precision_options_are_in_every_computing_command(name, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([name, "--help"])
    help_text = squeeze(capsys.readouterr().out)
    for fragment in (
        "--deviceDEVICE",
        "cpu,cudaorcuda:N(default:cudawhenavailable,elsecpu)",
        "--dtype",
        "float32,bfloat16,float16(default:bfloat16onaCUDAdevicethathasit,elsefloat32)",
        "float32masterweights",
        "--weights{float,int8}",
        "onefloat32scaleperoutputchannel",
        "--unified-memory",
    ):
        assert fragment in help_text, (name, fragment)
    assert ("oneperagent" in help_text) == (name == "simulate")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--device", "cuda"], ["--device", "cuda", "no CUDA device"]),
        (["--device", "tpu"], ["unsupported device 'tpu'"]),
    ],
    ids=["no-cuda", "unknown-device"],
)
def test_a_device_this_machine_lacks_exits_2_with_one_line(tmp_path, capsys, args, fragments):
    if torch.cuda.is_available() and args[1] == "cuda":
        pytest.skip("this machine has CUDA")
    status = main(["train", *args, *DATA, "--workdir", str(tmp_path / "w")])
    assert status == 2
    assert_one_line_error(capsys.readouterr().err, *fragments[1:])


def test_an_unknown_dtype_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["train", "--dtype", "float8"])
    assert info.value.code == 2
    assert "invalid choice: 'float8'" in capsys.readouterr().err
    status = main(["simulate", "--dtype", "float32,float8", "--quiet"])
    assert status == 2
    assert_one_line_error(capsys.readouterr().err, "float8")


def test_an_unknown_weights_storage_is_a_usage_error(capsys):
    for name in DEVICE_COMMANDS:
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args([name, "--weights", "int4"])
        assert info.value.code == 2
        assert "invalid choice: 'int4' (choose from 'float', 'int8')" in capsys.readouterr().err
