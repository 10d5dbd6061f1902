"""Run N JAX processes on localhost (CPU) as one distributed job.

Reusable by any test that needs real multi-process JAX:

  outs = run_processes(CODE, num_processes=2, devices_per_process=2)

runs CODE in N fresh Python processes after a preamble that sets the CPU
device count, calls `jax.distributed.initialize(coordinator_address=
"localhost:<free port>", num_processes=N, process_id=i)` and defines
`emit(obj)`; each process's last `emit`ted JSON object is returned, ordered
by process id. For a command line (e.g. the trainer):

  results = launch(lambda i, addr: [sys.executable, "-m", "ssr_jax.main",
                                    ..., f"--config.distributed."
                                    f"coordinator_address={addr}", ...], 2)

gives one `ProcessResult(returncode, stdout, stderr)` per process.

Notes (jax 0.10.2): cross-process CPU collectives use Gloo by default, so no
extra config is needed; Gloo prints "[Gloo] Rank ..." lines on stdout, which
is why results travel on marked lines. A failing or hung process makes the
others block in collectives: every process is killed at the timeout or as
soon as one fails, and the error shows each one's output tail.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_MARKER = "@@SSR_JAX_RESULT@@ "

_PREAMBLE = """
import json, os, sys
sys.path.insert(0, {root!r})
import jax
jax.distributed.initialize(coordinator_address={address!r},
                           num_processes={n}, process_id={pid})
def emit(obj):
    print({marker!r} + json.dumps(obj), flush=True)
"""


@dataclasses.dataclass
class ProcessResult:
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    """A TCP port free on localhost right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child_env(devices_per_process: int,
              extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a CPU child: N host devices, repo on the path."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                   env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count="
        f"{devices_per_process}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    env.update(extra_env or {})
    return env


def _tail(text: str, n: int = 3000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def launch(make_argv: Callable[[int, str], Sequence[str]],
           num_processes: int = 2, devices_per_process: int = 2,
           timeout: float = 120.0,
           extra_env: Mapping[str, str] | None = None,
           check: bool = True) -> list[ProcessResult]:
    """Starts `make_argv(process_id, "localhost:PORT")` N times and waits.

    Args:
      make_argv: builds process i's command line from its id and the
        coordinator address.
      num_processes: N.
      devices_per_process: CPU devices per process.
      timeout: seconds for the whole job.
      extra_env: added to every child's environment.
      check: raise RuntimeError if a process fails or times out.

    Returns:
      One ProcessResult per process, by process id.
    """
    address = f"localhost:{free_port()}"
    env = child_env(devices_per_process, extra_env)
    procs, files = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(num_processes):
            out = open(os.path.join(tmp, f"{i}.out"), "w+")
            err = open(os.path.join(tmp, f"{i}.err"), "w+")
            files.append((out, err))
            procs.append(subprocess.Popen(
                list(make_argv(i, address)), stdout=out, stderr=err,
                env=env, cwd=ROOT))
        deadline = time.monotonic() + timeout
        timed_out = False
        while any(p.poll() is None for p in procs):
            failed = any(p.returncode not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                timed_out = not failed
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                for p in procs:
                    p.wait()
                break
            time.sleep(0.05)
        results = []
        for p, (out, err) in zip(procs, files, strict=True):
            out.seek(0)
            err.seek(0)
            results.append(ProcessResult(p.returncode, out.read(),
                                         err.read()))
            out.close()
            err.close()
    if check and (timed_out or any(r.returncode for r in results)):
        why = f"timed out after {timeout:.0f} s" if timed_out else "failed"
        report = "\n".join(
            f"--- process {i}: exit {r.returncode}\nstdout:\n"
            f"{_tail(r.stdout)}\nstderr:\n{_tail(r.stderr)}"
            for i, r in enumerate(results))
        raise RuntimeError(f"multi-process job {why}\n{report}")
    return results


def parse_results(stdout: str) -> list[dict]:
    """Every JSON object `emit`ted on `stdout`, in order."""
    return [json.loads(line[len(RESULT_MARKER):])
            for line in stdout.splitlines()
            if line.startswith(RESULT_MARKER)]


def run_processes(code: str, num_processes: int = 2,
                  devices_per_process: int = 2, timeout: float = 120.0,
                  extra_env: Mapping[str, str] | None = None) -> list[dict]:
    """Runs `code` in N initialised JAX processes; their last `emit`s."""
    def make_argv(pid: int, address: str) -> list[str]:
        preamble = _PREAMBLE.format(root=ROOT, address=address,
                                    n=num_processes, pid=pid,
                                    marker=RESULT_MARKER)
        return [sys.executable, "-c",
                preamble + textwrap.dedent(code)]

    results = launch(make_argv, num_processes, devices_per_process, timeout,
                     extra_env)
    outs = []
    for i, r in enumerate(results):
        emitted = parse_results(r.stdout)
        if not emitted:
            raise RuntimeError(
                f"process {i} emitted nothing\nstdout:\n{_tail(r.stdout)}"
                f"\nstderr:\n{_tail(r.stderr)}")
        outs.append(emitted[-1])
    return outs
