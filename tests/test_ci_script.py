"""`.ci/run`: it runs the README's own commands, and a failed set-up fails it at once.

The behavioural test runs the real script in a scratch copy of its folder, with stand-ins
for `python3`, `pip`, `ruff` and `python` first on PATH: a unit test of the script's own
control flow, which must not install anything.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_block_after(heading: str) -> str:
    """The first line of the first ```bash block after the README line starting `heading`."""
    text = (ROOT / "README.md").read_text()
    start = text.index(heading)
    match = re.search(r"```bash\n(.+?)\n", text[start:])
    assert match is not None, f"no bash block after {heading!r} in README.md"
    return match.group(1)


def test_ci_runs_the_readme_set_up_and_test_commands_verbatim() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert _readme_block_after("Set up (") in script
    assert _readme_block_after("Run the tests:") in script


def _stand_in(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_a_failed_set_up_command_fails_ci_before_ruff(tmp_path: Path) -> None:
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    bin_dir = tmp_path / "stand-ins"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    venv_bin = tmp_path / ".venv" / "bin"
    _stand_in(
        bin_dir,
        "python3",
        f'mkdir -p "{venv_bin}" && echo \'PATH="{bin_dir}:$PATH"\' > "{venv_bin}/activate"',
    )
    _stand_in(bin_dir, "python", f'echo "python $*" >> "{calls}"')
    _stand_in(
        bin_dir,
        "pip",
        f'echo "pip $*" >> "{calls}"; '
        'if [[ " $* " == *" -e "* ]]; then echo "No space left on device" >&2; exit 1; fi',
    )
    _stand_in(bin_dir, "ruff", f'echo "ruff $*" >> "{calls}"')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    done = subprocess.run(
        ["bash", str(tmp_path / ".ci" / "run")], env=env, capture_output=True, text=True
    )

    assert done.returncode == 1
    assert "set-up command failed" in done.stderr
    ran = calls.read_text()
    assert "pip install torch==2.13.0" in ran
    assert "ruff" not in ran
    assert "pytest" not in ran
