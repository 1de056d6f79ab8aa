"""Test helpers shared by several test files (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path


def run_and_kill(cmd: list[str], kill_when: Path, cwd: Path, env: dict | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` and SIGKILL it from outside (process group included) as soon as the file ``kill_when``
    exists, e.g. a run's first resumable checkpoint: the crash a power cut or an OOM kill would cause,
    with no test hook in the product code. Returns the completed process (stdout/stderr as text)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: out.__setitem__(k, f.read()), daemon=True)
               for k, f in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for t in readers:
        t.start()
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and not Path(kill_when).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kill_when} did not appear within {timeout}s")
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for t in readers:
            t.join(10)
    return subprocess.CompletedProcess(cmd, proc.returncode, out.get("stdout", ""), out.get("stderr", ""))
