"""Files written by commit 449626f (the tree before DESIGN.md §1's layout) still load:
an adapter file evaluates to the figures its run reported, a prefix cache is reused
as it is (not rebuilt) and training from it reproduces the run, and a coordinator state
dir resumes. ``tests/fixtures/written_by_449626f/make.py`` wrote them (see there).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chainfed.agent.cli import main
from chainfed.proto.auth_token import write_token_file

FIXTURES = Path(__file__).parent / "fixtures" / "written_by_449626f"
TRAIN = ["--model", str(FIXTURES / "model"), "--data", str(FIXTURES / "data.csv")]
TRAIN += ["--train-rows", "32", "--val-rows", "16", "--max-len", "8", "--seed", "0"]
CHAIN = ["--start-layer", "2", "--window", "2", "--micro-batch", "8"]
FINAL = re.compile(r"^final: val metric (\S+), val loss (\S+)$", re.MULTILINE)


def reported_final() -> list[tuple[str, str]]:
    """The final line the old run printed, rebuilt from its report."""
    final = json.loads((FIXTURES / "train" / "report.json").read_text())["final"]
    return [(f"{final['val_metric']:.4f}", f"{final['val_loss']:.6f}")]


def test_adapter_file_evaluates_to_the_figures_its_run_reported(capsys):
    adapters = FIXTURES / "train" / "adapters.safetensors"

    assert main(["train", *TRAIN, "--eval-only", "--adapters", str(adapters)]) == 0

    assert FINAL.findall(capsys.readouterr().out) == reported_final()


def test_prefix_cache_is_reused_and_training_reproduces_the_run(tmp_path, capsys):
    workdir = shutil.copytree(FIXTURES / "train", tmp_path / "train")
    (workdir / "chain_state.safetensors").unlink()  # train again, from the cache on disk
    states = sorted(p.name for p in workdir.glob("cache/*/states-*.bin"))
    argv = ["train", *TRAIN, *CHAIN, "--steps-per-round", "2", "--max-rounds", "1"]

    assert main([*argv, "--workdir", str(workdir), "--quiet"]) == 0

    assert sorted(p.name for p in workdir.glob("cache/*/states-*.bin")) == states
    assert FINAL.findall(capsys.readouterr().out) == reported_final()


def test_coordinator_state_dir_resumes(tmp_path):
    state = shutil.copytree(FIXTURES / "state", tmp_path / "state")
    final = state / "final_adapters.safetensors"
    before = hashlib.sha256(final.read_bytes()).hexdigest()
    token = write_token_file(tmp_path / "token", "fixture")
    argv = [sys.executable, "-m", "chainfed.agent.cli", "coordinator", "--model", TRAIN[1]]
    argv += ["--state-dir", str(state), "--host", "127.0.0.1", "--port", "0"]
    argv += ["--token-file", str(token), "--exit-after-done", "0", *CHAIN]
    argv += ["--local-steps", "2", "--min-rounds-per-layer", "1", "--max-rounds-per-layer", "1"]
    argv += ["--aggregation", "ffa"]

    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout and "phase done, 3 rounds done" in done.stdout
    assert "final layers [2, 3]" in done.stdout
    assert hashlib.sha256(final.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("name", ["model", "data.csv", "train", "state"])
def test_fixture_is_present(name):
    assert (FIXTURES / name).exists(), f"run {FIXTURES / 'make.py'} with the code of 449626f"
