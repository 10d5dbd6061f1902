"""Preempt a training subprocess: start it, wait for a marker line on its
stdout, send it a signal, wait for it to exit.

Reusable for any trainer that prints a line per step and saves on SIGTERM:

  result = preempt([sys.executable, "-m", "ssr_jax.main", ...],
                   marker=re.compile(r"^step 3\\b"))
  assert result.returncode == 0 and result.signalled_at is not None

The child's stderr goes to a temporary file (no pipe can fill up and block
it); stdout is read line by line by a thread so the marker is seen as soon
as the child flushes it (print(..., flush=True) or `python -u`).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    signalled_at: str | None  # the stdout line that triggered the signal


def _env(extra_env: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    env.update(extra_env or {})
    return env


def preempt(argv: Sequence[str], marker: str | re.Pattern,
            sig: int = signal.SIGTERM, timeout: float = 120.0,
            extra_env: Mapping[str, str] | None = None,
            cwd: str = ROOT) -> RunResult:
    """Runs `argv`; sends `sig` after the first stdout line matching
    `marker` (a regex); waits until exit or `timeout` (then kills it and
    raises TimeoutError with the output so far)."""
    pattern = re.compile(marker) if isinstance(marker, str) else marker
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE,
                                stderr=err, text=True, env=_env(extra_env),
                                cwd=cwd)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        out, hit = [], None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = lines.get(timeout=max(0.0, left))
            except queue.Empty:
                proc.kill()
                proc.wait()
                err.seek(0)
                raise TimeoutError(
                    f"{argv[:3]}... still running after {timeout:.0f} s\n"
                    f"stdout:\n{''.join(out)[-3000:]}\n"
                    f"stderr:\n{err.read()[-3000:]}") from None
            if line is None:
                break
            out.append(line)
            if hit is None and pattern.search(line):
                hit = line.rstrip("\n")
                proc.send_signal(sig)
        proc.wait()
        reader.join()
        err.seek(0)
        return RunResult(proc.returncode, "".join(out), err.read(), hit)


def run(argv: Sequence[str], timeout: float = 120.0,
        extra_env: Mapping[str, str] | None = None,
        cwd: str = ROOT) -> RunResult:
    """Runs `argv` to completion (no signal)."""
    proc = subprocess.run(list(argv), capture_output=True, text=True,
                          timeout=timeout, env=_env(extra_env), cwd=cwd,
                          check=False)
    return RunResult(proc.returncode, proc.stdout, proc.stderr, None)
