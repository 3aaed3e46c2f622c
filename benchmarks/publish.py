"""Copy measured benchmark tables into the top-level README, so it shows figures a run
printed, never hand-typed ones.

    python benchmarks/publish.py benchmarks/results/memory-X benchmarks/results/dp-report

Each argument is a result folder written by ``memory.py``, ``accuracy.py`` or ``dp.py``:
its ``<kind>.md`` (which names the command, date and machine of the run) replaces the
README's block between ``<!-- measured:<kind> -->`` and ``<!-- /measured:<kind> -->``,
headings moved two levels down; its plot is copied to ``benchmarks/measured/<kind>.png``
(committed with the README) and the link rewritten. A folder without a report, a report
without its command and date, or a README without the markers is an error, and then the
README is left as it was.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

KINDS = ("memory", "accuracy", "dp")
ROOT = Path(__file__).resolve().parents[1]


class PublishError(Exception):
    """A result folder or README that cannot be published from; the message says why."""


def find_report(folder: Path) -> tuple[str, str, Path | None]:
    """``(kind, markdown, plot)`` of a result folder; checks it records command and date."""
    found = [kind for kind in KINDS if (folder / f"{kind}.md").is_file()]
    if len(found) != 1:
        raise PublishError(
            f"{folder}: expected exactly one of {', '.join(k + '.md' for k in KINDS)}, "
            f"found {len(found)}"
        )
    kind = found[0]
    try:
        record = json.loads((folder / f"{kind}.json").read_text())
    except (OSError, ValueError) as exc:
        raise PublishError(f"{folder}: cannot read {kind}.json ({exc})") from None
    if not isinstance(record, dict) or not record.get("command") or not record.get("date"):
        raise PublishError(
            f"{folder / (kind + '.json')}: no command and date recorded; rerun the benchmark"
        )
    plot = folder / f"{kind}.png"
    return kind, (folder / f"{kind}.md").read_text(), plot if plot.is_file() else None


def demote_headings(markdown: str, levels: int = 2) -> str:
    """``# A`` -> ``### A`` (outside fenced code), so a report nests under a README section."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


def replace_block(readme: str, kind: str, body: str) -> str:
    """``readme`` with the text between the ``kind`` markers replaced by ``body``."""
    start, end = f"<!-- measured:{kind} -->", f"<!-- /measured:{kind} -->"
    if (
        readme.count(start) != 1
        or readme.count(end) != 1
        or readme.index(start) > readme.index(end)
    ):
        raise PublishError(f"README: needs one {start} ... {end} block")
    head, rest = readme.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{body.strip()}\n{end}{tail}"


def publish(folders: list[Path], readme: Path, images: Path) -> list[str]:
    """Update ``readme`` from ``folders``; returns the kinds published. All reports are
    checked before anything is written."""
    text = readme.read_text()
    plots: list[tuple[Path, Path]] = []
    kinds = []
    for folder in folders:
        kind, markdown, plot = find_report(folder)
        body = demote_headings(markdown)
        if plot is not None:
            target = images / f"{kind}.png"
            relative = target.relative_to(readme.parent).as_posix()
            body = body.replace(f"]({plot.name})", f"]({relative})")
            plots.append((plot, target))
        text = replace_block(text, kind, body)
        kinds.append(kind)
    for source, target in plots:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    readme.write_text(text)
    return kinds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Copy the tables of benchmark result folders (memory.py, accuracy.py, "
        "dp.py) into README.md between its <!-- measured:KIND --> markers.",
    )
    parser.add_argument("folders", nargs="+", type=Path, help="result folders to publish")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="%(default)s")
    parser.add_argument(
        "--images",
        type=Path,
        default=ROOT / "benchmarks" / "measured",
        help="where the plots are copied (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        kinds = publish(args.folders, args.readme, args.images)
    except PublishError as exc:
        print(f"publish: {exc}", file=sys.stderr)
        return 2
    print(f"{args.readme}: published {', '.join(kinds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
