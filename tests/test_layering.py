"""Who may import whom (DESIGN.md §1), checked on every file of the four code folders,
and the coordinator's service importable without the agent stack.

The rules, by layer (a module's layer is its folder; agent/ by subfolder once it has them):

* proto imports nothing of ours; kernels nothing of ours;
* coordinator imports proto only;
* agent/runtime imports kernels and proto; convert and training also runtime; federation
  also training; app (with ``agent/cli.py``, the composition root) anything, the
  coordinator's public API included;
* the subcommands (``agent/app/*_command.py``) never import each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("proto", "kernels", "coordinator", "agent")
AGENT_BASE = {"agent", "proto"}
"""``agent/errors.py`` and the package itself: every agent layer may use them."""
ALLOWED = {
    "proto": {"proto"},
    "kernels": {"kernels"},
    "coordinator": {"coordinator", "proto"},
    "agent": AGENT_BASE,
    "agent.runtime": AGENT_BASE | {"agent.runtime", "kernels"},
    "agent.convert": AGENT_BASE | {"agent.convert", "agent.runtime", "kernels"},
    "agent.training": AGENT_BASE | {"agent.training", "agent.runtime", "kernels"},
    "agent.federation": AGENT_BASE
    | {"agent.federation", "agent.training", "agent.runtime", "kernels"},
    "agent.app": AGENT_BASE
    | {
        "agent.app",
        "agent.federation",
        "agent.training",
        "agent.convert",
        "agent.runtime",
        "kernels",
        "coordinator",
    },
}
"""Layer -> the layers its modules may import (DESIGN.md §1's table)."""
AGENT_LAYERS = ("runtime", "convert", "training", "federation", "app")
AGENT_STACK = ("chainfed.agent", "tokenizers", "tqdm", "triton", "gguf", "matplotlib")


def layer_of_module(parts: list[str]) -> str:
    """The layer of module ``chainfed.<parts>`` (``agent.cli`` is the composition root)."""
    if parts[0] == "agent" and len(parts) > 1:
        if parts[1] in AGENT_LAYERS:
            return f"agent.{parts[1]}"
        if parts[1] == "cli":
            return "agent.app"
    return parts[0]


def layer_of(path: Path) -> str:
    return layer_of_module(list(path.relative_to(ROOT).with_suffix("").parts))


def chainfed_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, module, layer) of every ``chainfed.<folder>`` import in the file, anywhere
    in it (lazy imports inside functions and ``_lazy("chainfed....")`` strings included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module in ("chainfed.agent", "chainfed.agent.app"):
                names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.startswith("chainfed.") and " " not in node.value:
                names = [node.value]
        for name in names:
            parts = name.split(".")
            if parts[0] == "chainfed" and len(parts) > 1 and parts[1] in FOLDERS:
                found.append((node.lineno, name, layer_of_module(parts[1:])))
    return found


def code_files() -> list[Path]:
    return sorted(
        p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py") if "_pb2" not in p.name
    )


@pytest.mark.parametrize("path", code_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_imports_follow_the_layers(path: Path):
    layer = layer_of(path)
    wrong = [
        f"line {line}: {module} ({target})"
        for line, module, target in chainfed_imports(path)
        if target not in ALLOWED[layer]
    ]
    assert wrong == [], f"{layer} may import {sorted(ALLOWED[layer])} only"


@pytest.mark.parametrize(
    "path", sorted((ROOT / "agent" / "app").glob("*_command.py")), ids=lambda p: p.name
)
def test_commands_never_import_each_other(path: Path):
    others = [
        f"line {line}: {module}"
        for line, module, _ in chainfed_imports(path)
        if module.endswith("_command") and module.split(".")[-1] != path.stem
    ]
    assert others == []


def test_the_rules_catch_a_coordinator_importing_the_agent(tmp_path: Path):
    bad = tmp_path / "bad.py"
    bad.write_text("from chainfed.agent.runtime.model import StreamingModel\n")
    assert chainfed_imports(bad) == [(1, "chainfed.agent.runtime.model", "agent.runtime")]
    assert "agent.runtime" not in ALLOWED["coordinator"]


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
