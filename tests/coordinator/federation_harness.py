"""Real ``chainfed coordinator`` / ``chainfed agent`` processes on localhost, for tests.

A ``Federation`` owns one temporary root::

    ROOT/state/            the coordinator's --state-dir (state.json, tensors-*, final)
    ROOT/<agent id>/       each agent's --workdir (cache/train, cache/val, final adapters)
    ROOT/logs/<name>.log   stdout + stderr of every process it started (restarts append)

Processes run the console entry point through this interpreter
(``python -m chainfed.agent.cli``) with one BLAS thread each: on a small box four
processes with tiny batches only contend for cores. ``close()`` SIGKILLs whatever is
still running; ``report()`` returns every log, for printing when a test fails.

Pytest's importlib mode puts no test folder on ``sys.path``; the test module loads this
file by path.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open

from chainfed.proto.auth_token import write_token_file

CLI = [sys.executable, "-m", "chainfed.agent.cli"]
SERVICE = [sys.executable, "-m", "chainfed.coordinator"]
"""The coordinator alone, from a model spec file (no model, no training stack)."""
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}
T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Process:
    """One started ``chainfed`` process and its log file."""

    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen
    killed: bool = False
    """Set by ``kill()``: its death is the test's doing, not a failure."""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL (no clean-up handlers run) and reap."""
        self.killed = True
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=30)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, then the exit status."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=timeout)

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class Federation:
    """A coordinator and its agents, started as real processes under ``root``."""

    root: Path
    token: str = "s3cret"
    port: int = field(default_factory=free_port)
    processes: list[Process] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def token_file(self) -> Path:
        """``token`` in an owner-only file: how every process here gets it."""
        path = self.root / "token"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            write_token_file(path, self.token)
        return path

    def workdir(self, agent_id: str) -> Path:
        return self.root / agent_id

    # -- processes ------------------------------------------------------------------

    def spawn(
        self, name: str, *args: str, command: list[str] = CLI, env: dict[str, str] | None = None
    ) -> Process:
        """``command ARGS`` (default: ``chainfed ARGS``) in ``root``, ``env`` added to the
        environment; output appended to ``logs/NAME.log``."""
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        argv = [*command, *map(str, args)]
        with open(log, "ab") as out:
            out.write(f"$ {' '.join(argv[2:])}\n".encode())
            out.flush()
            popen = subprocess.Popen(
                argv,
                cwd=self.root,
                env={**ENV, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        process = Process(name, argv, log, popen)
        self.processes.append(process)
        return process

    def coordinator(
        self,
        *flags: str,
        exit_after_done: float = 1.0,
        name: str = "coordinator",
        spec: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Process:
        """``chainfed coordinator`` on ``port`` with ``state_dir``, plus ``flags``; with
        ``spec``, ``python -m chainfed.coordinator --model-spec SPEC`` instead."""
        command, head = (
            (CLI, ["coordinator"]) if spec is None else (SERVICE, ["--model-spec", spec])
        )
        return self.spawn(
            name,
            *head,
            "--state-dir",
            self.state_dir,
            "--host",
            "127.0.0.1",
            "--port",
            self.port,
            "--token-file",
            self.token_file,
            "--exit-after-done",
            exit_after_done,
            "--verbose",
            *flags,
            command=command,
            env=env,
        )

    def agent(self, agent_id: str, *flags: str) -> Process:
        """``chainfed agent`` with a fixed ``--agent-id`` and ``--workdir``, plus ``flags``."""
        return self.spawn(
            agent_id,
            "agent",
            "--coordinator",
            self.address,
            "--token-file",
            self.token_file,
            "--agent-id",
            agent_id,
            "--workdir",
            self.workdir(agent_id),
            "--quiet",
            "--verbose",
            *flags,
        )

    def run_cli(
        self, *args: str, timeout: float = 60, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """A short ``chainfed`` command (e.g. ``status``), run to completion; ``env`` adds
        to the environment."""
        return subprocess.run(
            [*CLI, *map(str, args)],
            cwd=self.root,
            env={**ENV, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def close(self) -> None:
        """SIGKILL every process still running (idempotent)."""
        for process in self.processes:
            if process.alive():
                process.kill()

    def report(self) -> str:
        parts, shown = [], set()
        for process in self.processes:
            rc = process.popen.poll()
            parts.append(f"===== {process.name} (pid {process.pid}, rc {rc}) =====")
            if process.log not in shown:  # a restart appends to the same log
                shown.add(process.log)
                parts.append(process.text())
        state = self.state()
        if state is not None:
            parts.append("===== state.json history =====")
            parts.extend(json.dumps(r) for r in state.get("history", []))
        return "\n".join(parts)

    # -- observing ------------------------------------------------------------------

    def state(self) -> dict[str, Any] | None:
        """The coordinator's ``state.json`` (replaced atomically), or None before it exists."""
        try:
            return json.loads((self.state_dir / "state.json").read_text())
        except (OSError, ValueError):
            return None

    def history(self) -> list[dict[str, Any]]:
        state = self.state()
        return [] if state is None else state["history"]

    def wait_until(
        self, probe: Callable[[], T], *, timeout: float, what: str, poll: float = 0.05
    ) -> T:
        """Poll ``probe`` until it returns something truthy; fail early (with every log)
        when a process the test did not kill exits non-zero."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            crashed = [
                p for p in self.processes if not p.killed and p.popen.poll() not in (None, 0)
            ]
            if crashed:
                names = ", ".join(f"{p.name} (rc {p.popen.poll()})" for p in crashed)
                raise AssertionError(f"while waiting for {what}: {names} exited\n{self.report()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f} s waiting for {what}\n{self.report()}"
                )
            time.sleep(poll)

    def wait_exit(self, processes: list[Process], *, timeout: float) -> dict[str, int]:
        """Exit status of each process (by name), waiting at most ``timeout`` in all."""
        deadline = time.monotonic() + timeout
        codes = {}
        for process in processes:
            try:
                codes[process.name] = process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                raise AssertionError(f"{process.name} still running after {timeout:.0f} s") from exc
        return codes


def read_tensor_bytes(path: Path, prefix: str = "") -> dict[str, tuple[str, tuple, bytes]]:
    """{name: (dtype, shape, raw bytes)} of a safetensors file's tensors named ``prefix*``."""
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            if name.startswith(prefix):
                t = f.get_tensor(name).contiguous()
                out[name] = (
                    str(t.dtype),
                    tuple(t.shape),
                    t.reshape(-1).view(torch.uint8).numpy().tobytes(),
                )
    return out


def cache_snapshot(workdir: Path) -> dict[str, dict[str, Any]]:
    """Per prefix cache of an agent (train, val): its ``meta.json`` and the identity of
    the states file it names (name, inode, size, mtime in ns). A rebuilt or advanced cache
    writes a new, randomly named file and a new meta.json; a reused one changes nothing."""
    out = {}
    for split in ("train", "val"):
        directory = workdir / "cache" / split
        meta_path = directory / "meta.json"
        meta = json.loads(meta_path.read_text())
        states = directory / meta["file"]
        st, mst = states.stat(), meta_path.stat()
        out[split] = {
            "meta": meta,
            "meta_mtime_ns": mst.st_mtime_ns,
            "meta_inode": mst.st_ino,
            "file": meta["file"],
            "inode": st.st_ino,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "files": sorted(p.name for p in directory.iterdir()),
        }
    return out


def round_number(round_id: str) -> int:
    """``r12`` / ``eval13`` / ``probe1`` -> 12 / 13 / 1 (ids share one growing sequence)."""
    digits = round_id.lstrip("abcdefghijklmnopqrstuvwxyz")
    return int(digits)
