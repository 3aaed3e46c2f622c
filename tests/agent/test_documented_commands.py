"""The READMEs' `chainfed …` commands and options exist in today's CLI.

Options get renamed or removed; a README that still shows the old spelling sends a user to
an error. Each command line of a shell block runs through the real parser (nothing runs):
optional parts in brackets count as written, a shell variable reads as 1, and any other
placeholder value (`S`, `…`, `<dir>`) is dropped with its option, since it stands for a
value the reader chooses. The prose's inline mentions (`chainfed coordinator
--poll-seconds`) are often partial, so there each option must be one the subcommand has.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from chainfed.agent.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = ("README.md", "benchmarks/README.md")
SHELL_VARIABLE = re.compile(r"\$\{?\w+\}?")
PLACEHOLDER = re.compile(r"^[A-Z]$|…|^<.*>$")


def documented_commands(text: str) -> list[str]:
    """The `chainfed` command lines of the text's shell blocks, continuations joined,
    comments, redirections, pipes and a trailing `&` cut off."""
    found = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            match = re.search(r"(?:^|\s|\(\s*)(chainfed\s.*)", line.split(" #")[0])
            if match and not line.lstrip().startswith("pip"):
                command = re.split(r"&&|\|\||[|;>&]", match.group(1))[0]
                found.append(command.strip())
    return found


def argv_of(command: str) -> list[str]:
    """The command's arguments, brackets opened, shell variables set to 1, placeholder
    values dropped with their option."""
    argv: list[str] = []
    opened = SHELL_VARIABLE.sub("1", command.replace("[", " ").replace("]", " "))
    for token in shlex.split(opened)[1:]:
        if PLACEHOLDER.search(token):
            if argv and argv[-1].startswith("--"):
                argv.pop()
            continue
        argv.append(token)
    return argv


def mentioned_options(text: str) -> list[tuple[str, str]]:
    """(subcommand, option) of every `--option` in the text's inline `chainfed …` spans
    outside the shell blocks; wildcards (`--dp-*`) left out."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S).replace("\n", " ")
    found = []
    for span in re.findall(r"`(?:time |OMP_NUM_THREADS=\d+ )?chainfed ([\w-]+)([^`]*)`", prose):
        subcommand, rest = span
        for option in re.findall(r"(?<![\w-])--[\w-]+\*?", rest):
            if not option.endswith("*"):
                found.append((subcommand, option))
    return found


def options_of(subcommand: str) -> set[str]:
    parser = build_parser(only=subcommand)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(commands.choices[subcommand]._option_string_actions)


COMMANDS = [(name, c) for name in DOCUMENTS for c in documented_commands((ROOT / name).read_text())]


def test_the_readmes_document_commands() -> None:
    assert len(COMMANDS) >= 20
    assert {argv_of(c)[0] for _, c in COMMANDS} >= {"demo", "train", "simulate", "agent"}


@pytest.mark.parametrize(
    ("document", "command"),
    COMMANDS,
    ids=[f"{d}:{i}:{argv_of(c)[0]}" for i, (d, c) in enumerate(COMMANDS)],
)
def test_a_documented_command_parses(document: str, command: str) -> None:
    argv = argv_of(command)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            build_parser(only=argv[0]).parse_args(argv)
    except SystemExit as exit_:
        assert exit_.code in (0, None), f"{document}: `{command}`: {errors.getvalue().strip()}"


def test_a_misspelt_option_is_caught() -> None:
    argv = argv_of("chainfed train --seed S --train-rowz 10")
    assert argv == ["train", "--train-rowz", "10"]
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        build_parser(only="train").parse_args(argv)


MENTIONS = sorted({m for name in DOCUMENTS for m in mentioned_options((ROOT / name).read_text())})


@pytest.mark.parametrize(("subcommand", "option"), MENTIONS, ids=[" ".join(m) for m in MENTIONS])
def test_an_option_mentioned_in_the_prose_exists(subcommand: str, option: str) -> None:
    assert option in options_of(subcommand), f"`chainfed {subcommand}` has no {option}"
