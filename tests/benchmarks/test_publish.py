"""benchmarks/publish.py: measured tables go into the README between markers, and a
report that does not record how it was produced is refused with the README untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def publish_module(benchmark_script):
    return benchmark_script("publish")


README = (
    "# Tool\n\n## Measured\n\n<!-- measured:dp -->\nold table\n<!-- /measured:dp -->\n\n## End\n"
)


def result_folder(tmp_path: Path, record: dict) -> Path:
    folder = tmp_path / "dp-run"
    folder.mkdir()
    (folder / "dp.json").write_text(json.dumps(record))
    (folder / "dp.md").write_text(
        "# Accuracy vs ε\n\n| ε | acc |\n|---|---|\n| 1 | 0.29 |\n\n![p](dp.png)\n"
    )
    (folder / "dp.png").write_bytes(b"\x89PNG fake")
    return folder


def publish(module, folder: Path, readme: Path) -> int:
    """``publish.py FOLDER --readme README --images <beside README>/img``."""
    return module.main(
        [str(folder), "--readme", str(readme), "--images", str(readme.parent / "img")]
    )


def test_publish_replaces_the_block_and_copies_the_plot(publish_module, tmp_path):
    folder = result_folder(tmp_path, {"command": "python benchmarks/dp.py", "date": "2026-11-26"})
    readme = tmp_path / "README.md"
    readme.write_text(README)

    assert publish(publish_module, folder, readme) == 0
    text = readme.read_text()
    assert "old table" not in text and "| 1 | 0.29 |" in text
    assert "### Accuracy vs ε" in text  # nested under the README's own section
    assert (
        "![p](img/dp.png)" in text and (tmp_path / "img" / "dp.png").read_bytes() == b"\x89PNG fake"
    )
    assert text.startswith("# Tool\n") and text.endswith("<!-- /measured:dp -->\n\n## End\n")

    publish(publish_module, folder, readme)
    assert readme.read_text() == text  # idempotent


@pytest.mark.parametrize(
    "record, readme_text, message",
    [
        ({"date": "2026-11-26"}, README, "no command and date"),
        ({"command": "python benchmarks/dp.py", "date": "2026-11-26"}, "# Tool\n", "needs one"),
    ],
    ids=["report-without-command", "readme-without-markers"],
)
def test_publish_refuses_and_leaves_the_readme(
    publish_module, tmp_path, capsys, record, readme_text, message
):
    folder = result_folder(tmp_path, record)
    readme = tmp_path / "README.md"
    readme.write_text(readme_text)
    assert publish(publish_module, folder, readme) == 2
    assert message in capsys.readouterr().err
    assert readme.read_text() == readme_text
    assert not (tmp_path / "img").exists()


def test_publish_help_explains(publish_module, capsys):
    with pytest.raises(SystemExit):
        publish_module.main(["--help"])
    assert "measured:KIND" in capsys.readouterr().out
