"""Every entry point answers `--help`, and every YAML under configs/ parses with its script.

(The real one-process-per-run CLI is exercised by tests/test_convert.py, test_download.py and
test_models.py; here a fork per command keeps ~20 runs from paying ~3 s of torch import each.)

Entry points and configs are discovered with globs at collection time, so the ones added later are
covered too. A config names its script on its first line: `# script: pretrain/gpt.py`; a YAML
without that line must still be valid YAML (a mapping).
"""

import os
import re
import subprocess
import sys
import json
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENTRY_DIRS = ("pretrain", "finetune", "generate", "scripts")
SCRIPT_LINE = re.compile(r"^#\s*script:\s*(\S+\.py)\s*$")

ENTRY_POINTS = sorted(p.relative_to(ROOT).as_posix() for d in ENTRY_DIRS for p in (ROOT / d).glob("*.py")
                      if not p.name.startswith("_"))
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml"))


def script_of(config: str) -> str | None:
    lines = (ROOT / config).read_text().splitlines()
    m = SCRIPT_LINE.match(lines[0].strip()) if lines else None
    return m.group(1) if m else None


# One child process imports what every entry point shares (torch, jsonargparse, litmodel) once, then
# forks a fresh process per command that runs the script as `python <script> <args>` would (runpy
# with run_name="__main__", the script's dir first on sys.path), with its own stdout/stderr files.
FORK_DRIVER = r"""
import json, os, runpy, sys
import torch, jsonargparse, yaml
try:
    import litmodel
except Exception:
    pass
results = {}
for key, argv, out_path, err_path in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.dup2(os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
            os.dup2(os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    results[key] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(results))
"""


@lru_cache(maxsize=None)
def _all_runs() -> dict[tuple[str, ...], tuple[int, str, str]]:
    """{argv: (exit code, stdout, stderr)} for every `--help` and `--print_config` run."""
    import tempfile

    commands = [(script, "--help") for script in ENTRY_POINTS]
    commands += [(script_of(c), "--config", c, "--print_config") for c in CONFIGS
                 if script_of(c) and (ROOT / script_of(c)).is_file()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [[str(i), list(argv), f"{tmp}/{i}.out", f"{tmp}/{i}.err"] for i, argv in enumerate(commands)]
        proc = subprocess.run([sys.executable, "-c", FORK_DRIVER, json.dumps(jobs)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        codes = json.loads(proc.stdout.splitlines()[-1])
        return {argv: (codes[str(i)], Path(f"{tmp}/{i}.out").read_text(), Path(f"{tmp}/{i}.err").read_text())
                for i, argv in enumerate(commands)}


def test_entry_points_found():
    assert "scripts/convert_hf_checkpoint.py" in ENTRY_POINTS and "scripts/download.py" in ENTRY_POINTS


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help(script):
    code, stdout, stderr = _all_runs()[(script, "--help")]
    assert code == 0, stderr[-2000:]
    assert "usage:" in stdout.lower() and "--config" in stdout, stdout[-2000:]


@pytest.mark.parametrize("config", CONFIGS or [pytest.param(None, marks=pytest.mark.skip("no configs yet"))])
def test_config_parses_with_its_script(config):
    data = yaml.safe_load((ROOT / config).read_text())
    assert isinstance(data, dict) and data, f"{config} must be a non-empty YAML mapping"
    script = script_of(config)
    if script is None:
        pytest.skip(f"{config} names no script on its first line (# script: <dir>/<script>.py)")
    assert (ROOT / script).is_file(), f"{config} names {script}, which does not exist"
    code, stdout, stderr = _all_runs()[(script, "--config", config, "--print_config")]
    assert code == 0, stderr[-2000:]
    printed = yaml.safe_load(stdout)
    for key, value in data.items():  # every key of the file reaches the script's parsed config
        assert key in printed, (config, key)
