r"""Benchmark: HF -> litmodel conversion of a ~1B-parameter checkpoint (time and peak memory).

    python benchmarks/convert.py                       # Llama-3.2-1B shape, bf16, ~500 MB shards
    python benchmarks/convert.py --model Llama-3.2-1B --shard_mb 500 --work_dir /tmp/convert-bench

1. Writes a random HF checkpoint of the registry model's shape (bf16 weights written directly with
   safetensors into shards of about --shard_mb, plus model.safetensors.index.json and config.json).
2. Copies the weight files with shutil.copyfile (the reference time), after evicting them from the
   page cache (os.sync + posix_fadvise DONTNEED: "cold-ish", the disk may still cache them).
3. Evicts again and runs `python scripts/convert_hf_checkpoint.py` in a child process, measuring
   its wall time (including Python + torch start-up) and peak RSS (the child's ru_maxrss from wait4;
   this parent never imports torch, so the forked child does not inherit a large RSS).

Targets: peak RSS < 1.25x the checkpoint's bytes; time < 2x the copy time. Standalone (not a test).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_random_hf_checkpoint(model: str, out: Path, shard_bytes: int) -> int:
    """A sharded HF checkpoint of the registry model's shape with random bf16 weights; returns the weight bytes."""
    import torch
    from safetensors.torch import save_file

    from litmodel.config import Config
    from litmodel.hf_names import lit_to_hf_plan
    from litmodel.hf import expected_lit_shapes

    config, dtype = Config.from_name(model), torch.bfloat16
    out.mkdir(parents=True, exist_ok=True)
    lit = {k: torch.empty(s, device="meta") for k, s in expected_lit_shapes(config).items()}
    shapes = {hf: tuple(fn(*[lit[n] for n in srcs]).shape) for hf, (srcs, fn) in lit_to_hf_plan(config).items()}
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = shape
        size += nbytes
    shards.append(current)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard.items():
            t = torch.empty(shape, dtype=dtype)
            t.normal_(0.0, 0.02, generator=gen) if len(shape) > 1 else t.fill_(1.0)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, out / fname, metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    hf = config.to_hf_config()
    hf.update(torch_dtype="bfloat16", dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return total


def evict(paths) -> None:
    """Drop the files' pages from the page cache (clean pages only, hence the sync first)."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Llama-3.2-1B", help="registry name whose shape is used")
    ap.add_argument("--shard_mb", type=int, default=500)
    ap.add_argument("--work_dir", type=Path, default=Path("/tmp/litmodel-convert-bench"))
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="pass --dtype to the conversion (float16: every tensor is cast, the non-zero-copy path)")
    ap.add_argument("--trials", type=int, default=4, help="copy/convert rounds (medians are reported)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--generate_only", type=Path, help=argparse.SUPPRESS)  # internal: run step 1 in a child
    args = ap.parse_args()
    if args.generate_only:
        print(write_random_hf_checkpoint(args.model, args.generate_only, args.shard_mb * 10**6))
        return

    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    src, copy_dir, out = work / "hf", work / "copy", work / "lit"
    t0 = time.perf_counter()
    gen = subprocess.run([sys.executable, __file__, "--model", args.model, "--shard_mb", str(args.shard_mb),
                          "--generate_only", str(src)], capture_output=True, text=True, check=True)
    weight_bytes = int(gen.stdout.split()[-1])
    weights = sorted(src.glob("*.safetensors"))
    ckpt_bytes = sum(p.stat().st_size for p in weights)
    print(f"wrote {len(weights)} shards, {ckpt_bytes / 1e9:.3f} GB ({weight_bytes / 2 / 1e9:.3f} B params) "
          f"in {time.perf_counter() - t0:.1f}s")

    def child(argv: list[str]) -> tuple[float, int, str]:
        """(wall seconds, peak RSS bytes, stdout) of a child process; rusage of that child alone (wait4)."""
        import tempfile

        with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=out_f, stderr=err_f, text=True)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            out_f.seek(0), err_f.seek(0)
            if proc.returncode:
                sys.exit(f"{argv} failed: {err_f.read()}")
            return wall, usage.ru_maxrss * 1024, out_f.read()

    startup_s, baseline, _ = child(["-c", "import torch, litmodel.hf"])
    copies, converts, inner, peaks = [], [], [], []

    def run_copy() -> None:
        evict(weights)
        copy_dir.mkdir()
        t0 = time.perf_counter()
        for p in weights:
            shutil.copyfile(p, copy_dir / p.name)
        copies.append(time.perf_counter() - t0)
        shutil.rmtree(copy_dir)
        os.sync()

    def run_convert() -> str:
        evict(weights)
        wall, peak, stdout = child(["scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(src),
                                    "--out_dir", str(out)] + (["--dtype", args.dtype] if args.dtype else []))
        converts.append(wall)
        peaks.append(peak)
        inner.append(float(re.search(r" in ([\d.]+)s", stdout).group(1)))
        shutil.rmtree(out)
        os.sync()
        return stdout

    for trial in range(args.trials):  # alternate the order: the machine is shared and its disk cache noisy
        if trial % 2 == 0:
            run_copy()
            stdout = run_convert()
        else:
            stdout = run_convert()
            run_copy()
        print(f"trial {trial + 1}: copy {copies[-1]:.2f}s, convert {converts[-1]:.2f}s end to end "
              f"({inner[-1]:.2f}s converting), peak RSS {peaks[-1] / 1e9:.3f} GB")
    out_bytes = float(re.search(r", ([\d.]+) MB", stdout).group(1)) * 1e6  # the output is removed after each trial
    copy_s, convert_s, inner_s, peak = (statistics.median(copies), statistics.median(converts),
                                        statistics.median(inner), max(peaks))
    print(stdout.strip())
    print(f"checkpoint {ckpt_bytes / 1e9:.3f} GB; output {out_bytes / 1e9:.3f} GB; medians of {args.trials} trials:")
    print(f"copy (shutil.copyfile, cold-ish): {copy_s:.2f}s")
    print(f"convert: {convert_s:.2f}s end to end = {convert_s / copy_s:.2f}x copy (incl. start-up; "
          f"`python -c 'import torch, litmodel.hf'` alone takes {startup_s:.2f}s); conversion itself "
          f"{inner_s:.2f}s = {inner_s / copy_s:.2f}x copy; target < 2x")
    print(f"peak RSS: {peak / 1e9:.3f} GB = {peak / ckpt_bytes:.2f}x checkpoint bytes (target < 1.25x); "
          f"python+torch alone {baseline / 1e9:.3f} GB")
    ok = peak < 1.25 * ckpt_bytes and inner_s < 2 * copy_s  # time target judged without interpreter start-up
    what = f"{args.model} bf16{' -> ' + args.dtype if args.dtype else ''}, {len(weights)} shards"
    print(f"| {date.today()} | {what} | {ckpt_bytes / 1e9:.2f} GB | {copy_s:.1f} s | "
          f"{convert_s:.1f} s ({convert_s / copy_s:.2f}x) / {inner_s:.1f} s ({inner_s / copy_s:.2f}x) "
          f"| {peak / 1e9:.2f} GB ({peak / ckpt_bytes:.2f}x) | {'pass' if ok else 'FAIL'} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
