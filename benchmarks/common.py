"""Helpers shared by the benchmarks: machine record, timing statistics, tables, fixtures, results.

Every benchmark warms up, then reports the median and inter-quartile range of repeated timings,
prints a markdown table of figures measured side by side in the same run, and writes
benchmarks/results/<name>.json with a `machine` record. Timings are only meaningful on a machine
that is otherwise idle: `machine()` records the load average before and after, and `warn_if_busy()`
says so when another job is running.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# This checkout's bevcache, not the editable install's (a benchmark run from a clean worktree must
# measure the worktree's code); also makes `tests.conftest` importable.
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "work_dirs" / "bench"
CONFIGS = REPO / "configs"
TEACHER_CFG = CONFIGS / "tiny_teacher.py"
STUDENT_CFG = CONFIGS / "tiny_student.py"
PY = sys.executable


# ---------------------------------------------------------------------------------------------
# Machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "?"))
    except Exception:
        return None


def _git() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    try:
        # The benchmarks' own outputs do not count: a run of several benchmarks rewrites them as it goes.
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(changed)}
    except OSError:
        return {"commit": None, "dirty": None}


def machine() -> dict:
    """Where the numbers were taken: CPU, threads, library versions, GPU, load average."""
    import torch

    record: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {m: _version(m) for m in ("torch", "mmengine", "mmcv", "mmdet", "mmdet3d", "zarr", "numcodecs", "numpy")},
        "cuda": None,
        "loadavg_at_start": list(os.getloadavg()),
        "git": _git(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if torch.cuda.is_available():
        record["cuda"] = {"device": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                          "torch_cuda": torch.version.cuda}
    return record


def warn_if_busy(threshold: float = 0.5) -> None:
    """Print a warning when the 1-minute load average says another job is using the CPU."""
    load = os.getloadavg()[0]
    if load > threshold:
        print(f"WARNING: load average {load:.2f} before the benchmark: another job is running; "
              "timings taken under contention are not comparable.", file=sys.stderr, flush=True)


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (no-op on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cuda_peak_mib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


# ---------------------------------------------------------------------------------------------
# Timing


def stats(samples: Sequence[float]) -> dict:
    """median, IQR (q1, q3) and friends of a list of timings (seconds)."""
    xs = sorted(float(x) for x in samples)
    if not xs:
        return {"n": 0, "median": None, "q1": None, "q3": None, "iqr": None, "min": None, "mean": None}
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"n": len(xs), "median": statistics.median(xs), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": xs[0], "mean": statistics.fmean(xs)}


def time_repeated(fn: Callable[[], Any], *, warmup: int, repeats: int, cuda_sync: bool = True) -> list[float]:
    """Call fn warmup times untimed, then `repeats` times timed; returns the timed seconds."""
    for _ in range(warmup):
        fn()
    if cuda_sync:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if cuda_sync:
            sync()
        times.append(time.perf_counter() - t0)
    return times


def fmt_time(seconds: float | None) -> str:
    """A duration with a unit that keeps 3 significant figures readable."""
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def fmt_stat(s: dict) -> str:
    """'median (IQR iqr)' of a stats() dict."""
    if not s or s.get("median") is None:
        return "-"
    return f"{fmt_time(s['median'])} (IQR {fmt_time(s['iqr'])})"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (cells are str()-ed)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(list(headers)), sep, *(line(r) for r in cells)])


# ---------------------------------------------------------------------------------------------
# Arguments and results


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke test (< 30 s), not a measurement.")
    p.add_argument("--out", default=None, help="Result JSON [default: benchmarks/results/<name>.json; "
                                               "with --quick: work_dirs/bench/quick/<name>.json].")
    p.add_argument("--work", default=str(WORK), help="Scratch folder for data, stores, checkpoints.")
    return p


def result_path(name: str, args: argparse.Namespace) -> Path:
    """Where a benchmark's JSON goes (quick runs to the scratch folder, never over the real results)."""
    if args.out:
        return Path(args.out)
    if args.quick:
        return Path(args.work) / "quick" / f"{name}.json"
    return RESULTS / f"{name}.json"


def write_result(name: str, args: argparse.Namespace, result: dict, machine_record: dict) -> Path:
    """Write the result JSON with the machine record (and the load average now)."""
    path = result_path(name, args)
    machine_record = dict(machine_record, loadavg_at_end=list(os.getloadavg()))
    payload = {"benchmark": name, "quick": bool(args.quick), "args": vars(args), "machine": machine_record, **result}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(repo_relative(json.dumps(payload, indent=2, default=str)) + "\n")
    print(f"\nresults: {path}", flush=True)
    return path


def repo_relative(text: str) -> str:
    """Committed results name paths relative to the repository, never the machine's absolute ones."""
    return text.replace(str(REPO) + "/", "").replace(str(REPO), ".")


# ---------------------------------------------------------------------------------------------
# Fixtures: synthetic data, a random teacher checkpoint, a store


def synth_data(work: Path, num_train: int, num_val: int, seed: int = 0) -> Path:
    """A synthetic nuScenes-format data root of that size (reused if already there)."""
    root = Path(work) / f"data-{num_train}-{num_val}-s{seed}"
    if (root / "nuscenes_infos_val.pkl").is_file():
        return root
    from bevcache.synth import generate

    if root.exists():  # an interrupted generation: start over
        import shutil

        shutil.rmtree(root)
    print(f"[bench] synthetic data: {num_train} train / {num_val} val -> {root}", flush=True)
    generate(root, num_train=num_train, num_val=num_val, seed=seed)
    return root


def random_teacher_checkpoint(work: Path, seed: int = 123, config: Path = TEACHER_CFG, name: str = "teacher") -> Path:
    """A randomly initialised teacher of `config` (BN statistics perturbed) saved as a checkpoint."""
    path = Path(work) / f"{name}-random-s{seed}.pth"
    if path.is_file():
        return path
    import torch
    from mmdet3d.registry import MODELS

    from bevcache.runtime import load_config, setup_runtime

    setup_runtime()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODELS.build(load_config(config).model)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "meta": {"bench": "random init", "seed": seed}}, tmp)
    tmp.replace(path)
    return path


def teacher_store(work: Path, data_root: Path, checkpoint: Path, *, dtype: str = "float16") -> Path:
    """The tiny teacher's pts_neck store for data_root (reused when complete)."""
    from bevcache.extract import ExtractOptions, extract
    from bevcache.store import open_store, store_exists

    out = Path(work) / f"store-{data_root.name}-{dtype}.zarr"
    if store_exists(str(out)):
        try:
            if open_store(str(out)).complete_mask().all():
                return out
        except Exception:
            pass
    print(f"[bench] extracting the teacher store -> {out}", flush=True)
    extract(ExtractOptions(config=str(TEACHER_CFG), checkpoint=str(checkpoint), out=str(out), data_root=str(data_root),
                           dtype=dtype, num_workers=0, overwrite=True, progress=False))
    return out


def run_child(args: Sequence[str], *, env: dict | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run a child Python process from the repo root; raise with its output's tail if it fails."""
    proc = subprocess.run([PY, *args], cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"child {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    return proc
