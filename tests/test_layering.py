"""Who may import whom (DESIGN.md §1), checked on every file of the four code folders,
and the coordinator's service importable without the agent stack.

The rules, by layer (a module's layer is its folder; agent/ by subfolder once it has them):

* proto imports nothing of ours; kernels nothing of ours;
* coordinator imports proto only;
* agent imports proto and kernels; agent's command line (the composition root) may also
  import the coordinator's public API.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("proto", "kernels", "coordinator", "agent")
ALLOWED = {
    "proto": {"proto"},
    "kernels": {"kernels"},
    "coordinator": {"coordinator", "proto"},
    "agent": {"agent", "proto", "kernels"},
    "agent.app": {"agent", "proto", "kernels", "coordinator"},
}
"""Layer -> the layers its modules may import."""
COMPOSITION_ROOT = {
    "agent/cli.py",
    "agent/coordinator_command.py",
    "agent/simulation.py",
}
"""agent modules in the composition root (they may import the coordinator)."""

AGENT_STACK = ("chainfed.agent", "tokenizers", "tqdm", "triton", "gguf", "matplotlib")


def layer_of(path: Path) -> str:
    relative = path.relative_to(ROOT).as_posix()
    if relative in COMPOSITION_ROOT:
        return "agent.app"
    return relative.split("/", 1)[0]


def chainfed_imports(path: Path) -> list[tuple[int, str]]:
    """(line, target folder) of every ``chainfed.<folder>`` import in the file, anywhere in
    it (lazy imports inside functions and ``_lazy("chainfed....")`` strings included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.startswith("chainfed.") and " " not in node.value:
                names = [node.value]
        for name in names:
            parts = name.split(".")
            if parts[0] == "chainfed" and len(parts) > 1 and parts[1] in FOLDERS:
                found.append((node.lineno, parts[1]))
    return found


def code_files() -> list[Path]:
    return sorted(
        p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py") if "_pb2" not in p.name
    )


@pytest.mark.parametrize("path", code_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_imports_follow_the_layers(path: Path):
    layer = layer_of(path)
    wrong = [
        f"line {line}: chainfed.{target}"
        for line, target in chainfed_imports(path)
        if target not in ALLOWED[layer]
    ]
    assert wrong == [], f"{layer} may import {sorted(ALLOWED[layer])} only"


def test_the_rules_catch_a_coordinator_importing_the_agent(tmp_path: Path):
    bad = tmp_path / "bad.py"
    bad.write_text("from chainfed.agent.model import StreamingModel\n")
    assert chainfed_imports(bad) == [(1, "agent")]
    assert "agent" not in ALLOWED["coordinator"]


def _modules_after(imports: str) -> set[str]:
    code = f"import sys, {imports}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_service_modules_load_nothing_of_the_agent_stack():
    """Nothing of the agent stack beyond what ``import torch`` loads by itself: torch.hub
    imports tqdm when it is installed (a coordinator-only box lacks it, and
    ``test_coordinator_from_a_spec_file_runs_a_federation_of_three_agents`` serves a
    federation with the whole stack unimportable)."""
    loaded = _modules_after("chainfed.coordinator.service, chainfed.coordinator.chain_state")
    ours = loaded - _modules_after("torch")
    assert "chainfed.coordinator.service" in ours
    hits = [m for m in ours if any(m == b or m.startswith(b + ".") for b in AGENT_STACK)]
    assert hits == []
    assert not [m for m in loaded if m.split(".")[0] in ("tokenizers", "triton", "gguf")]
