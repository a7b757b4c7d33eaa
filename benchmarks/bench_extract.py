"""Samples/s of `bevcache extract` vs a bare teacher loop; 1 vs 2 processes under torchrun.

In one process, interleaved repetitions of:
  extract      `bevcache.extract.extract` writing a store (hooks, pooling, NaN check, writer thread);
               its own loop timing (`info["seconds"]`: loader + teacher + writes, not the model build)
  bare neck    the same loader (`bevcache.extract.teacher_batches`) and teacher with no hooks and
               no writes: `model.extract_feat(inputs, metas)` (voxel encoder -> pts_neck, what
               extraction needs), average-pooled and copied to host memory
  bare predict the same loop with the full `model(**data, mode='predict')` (head + box decoding),
               what extraction would cost without cutting the forward short
Target: extract / bare neck >= 0.95.

Then `torchrun --nproc-per-node N -m bevcache.cli extract ... --launcher pytorch`, wall clock of
the whole command (start-up included), N=1 with OMP_NUM_THREADS=2 vs N=2 with OMP_NUM_THREADS=1
(the same 2 cores either way; adjust with --threads).

    .venv/bin/python benchmarks/bench_extract.py            # full (alone on the machine)
    .venv/bin/python benchmarks/bench_extract.py --quick    # smoke test
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import time
from pathlib import Path

from common import (
    PY,
    REPO,
    TEACHER_CFG,
    cuda_peak_mib,
    fmt_time,
    machine,
    parser,
    peak_rss_mib,
    random_teacher_checkpoint,
    stats,
    sync,
    synth_data,
    table,
    warn_if_busy,
    write_result,
)

NAME = "extract"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bare:
    """The teacher, its dataset and the index batches, built once; loops without bevcache's extras."""

    def __init__(self, data_root: Path, checkpoint: Path, batch_size: int, workers: int):
        from bevcache.data import build_base_dataset, set_data_root, test_pipeline
        from bevcache.extract import build_teacher
        from bevcache.runtime import load_config, resolve_device, setup_runtime

        setup_runtime()
        cfg = load_config(TEACHER_CFG)
        set_data_root(cfg, str(data_root))
        self.device = resolve_device(None)
        self.model = build_teacher(cfg, str(checkpoint), self.device)
        self.dataset = build_base_dataset(cfg, "train", pipeline=test_pipeline(cfg))
        n = len(self.dataset)
        self.batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
        self.workers = workers

    def run(self, mode: str) -> float:
        """One pass over the split; returns seconds (loader start-up included, as in extract)."""
        import torch

        from bevcache.extract import teacher_batches
        from bevcache.features import pool_output

        sync()
        t0 = time.perf_counter()
        for _, data in teacher_batches(self.model, self.dataset, self.batches, self.workers):
            with torch.inference_mode():
                if mode == "neck":
                    metas = [s.metainfo for s in data["data_samples"]]
                    _, pts = self.model.extract_feat(data["inputs"], metas)
                    pool_output(pts, "avg", len(metas)).float().cpu().numpy()
                else:
                    self.model(**data, mode="predict")
        sync()
        return time.perf_counter() - t0


def run_extract(data_root: Path, checkpoint: Path, out: Path, args) -> tuple[float, float]:
    """(loop seconds as extract reports them, wall seconds of the whole call)."""
    from bevcache.extract import ExtractOptions, extract

    t0 = time.perf_counter()
    info = extract(ExtractOptions(config=str(TEACHER_CFG), checkpoint=str(checkpoint), out=str(out),
                                  data_root=str(data_root), batch_size=args.batch_size, num_workers=args.workers,
                                  chunk_rows=args.chunk_rows, dtype="float16", overwrite=True, progress=False))
    sync()
    wall = time.perf_counter() - t0
    if not info["complete"]:
        raise RuntimeError(f"extract left {out} incomplete")
    return float(info["seconds"]), wall


def in_process(args, work: Path, data: Path, warm_data: Path, ckpt: Path, n: int) -> dict:
    import logging

    logging.getLogger("bevcache").setLevel(logging.WARNING)
    # Warm-up on a tiny data root: first-call costs (imports, thread pools, allocator) paid untimed.
    warm = Bare(warm_data, ckpt, args.batch_size, args.workers)
    warm.run("neck")
    warm.run("predict")
    run_extract(warm_data, ckpt, work / "warmup.zarr", args)
    del warm

    bare = Bare(data, ckpt, args.batch_size, args.workers)
    paths = ["extract", "neck", "predict"]
    seconds: dict[str, list[float]] = {p: [] for p in paths}
    walls = []
    for rep in range(args.reps):
        for path in paths[rep % 3:] + paths[:rep % 3]:
            if path == "extract":
                loop, wall = run_extract(data, ckpt, work / "bench.zarr", args)
                seconds["extract"].append(loop)
                walls.append(wall)
            else:
                seconds[path].append(bare.run(path))
            print(f"[bench] rep {rep + 1}/{args.reps} {path:<8}: {n / seconds[path][-1]:.2f} samples/s", flush=True)
    from bevcache.store import open_store

    info = open_store(str(work / "bench.zarr")).info()
    result = {p: {"seconds": stats(s), "samples_per_second": n / statistics.median(s),
                  "samples_per_second_per_rep": [n / x for x in s]} for p, s in seconds.items()}
    result["extract"]["wall_seconds"] = stats(walls)  # + model/dataset build, probe, store creation
    result["extract"]["store_bytes_on_disk"] = info["bytes_on_disk"]
    # samples/s ratio extract / bare neck = bare seconds / extract seconds
    per_rep = [bare_s / ext_s for bare_s, ext_s in zip(seconds["neck"], seconds["extract"], strict=True)]
    return {"paths": result,
            "ratio_extract_over_bare_neck": {"of_medians": result["extract"]["samples_per_second"]
                                             / result["neck"]["samples_per_second"],
                                             "per_rep": per_rep},
            "ratio_extract_over_bare_predict": result["extract"]["samples_per_second"]
            / result["predict"]["samples_per_second"],
            "peak_rss_mib": peak_rss_mib(), "cuda_peak_mib": cuda_peak_mib()}


def torchrun(args, work: Path, data: Path, small: Path, ckpt: Path, n: int, n_small: int) -> dict:
    """Wall clock of the CLI under torchrun, on the benchmark set and on a small set: the difference
    gives the marginal samples/s with the start-up (imports, model build, gloo, store creation) removed."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        return {"skipped": "one CUDA device: 2 processes would share it; the comparison is for CPU threads"}
    torchrun_bin = str(Path(PY).parent / "torchrun")
    configs = [(1, args.threads), (2, max(1, args.threads // 2))]
    walls: dict[str, dict[str, list[float]]] = {}
    for rep in range(args.reps):
        for nproc, threads in configs if rep % 2 == 0 else configs[::-1]:
            key = f"{nproc} proc x {threads} thread{'s' if threads > 1 else ''}"
            for size, root in (("full", data), ("small", small)):
                out = work / f"torchrun-{nproc}-{size}.zarr"
                cmd = [torchrun_bin, "--nproc-per-node", str(nproc), "--master-port", str(_free_port()),
                       "-m", "bevcache.cli", "extract", "--config", str(TEACHER_CFG), "--checkpoint", str(ckpt),
                       "--out", str(out), "--data-root", str(root), "--overwrite", "--launcher", "pytorch",
                       "--batch-size", str(args.batch_size), "--num-workers", str(args.workers),
                       "--chunk-rows", str(args.chunk_rows), "--dtype", "float16"]
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if proc.returncode:
                    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
                    raise RuntimeError(f"torchrun extract failed ({key}):\n{tail}")
                walls.setdefault(key, {"full": [], "small": []})[size].append(wall)
            w = walls[key]
            print(f"[bench] rep {rep + 1}/{args.reps} torchrun {key}: {w['full'][-1]:.1f} s for {n} samples, "
                  f"{w['small'][-1]:.1f} s for {n_small}", flush=True)
    result = {}
    for key, w in walls.items():
        full, small_s = statistics.median(w["full"]), statistics.median(w["small"])
        marginal = (n - n_small) / (full - small_s) if n > n_small and full > small_s else None
        result[key] = {"wall_seconds": stats(w["full"]), "wall_seconds_small": stats(w["small"]),
                       "samples_per_second": n / full, "marginal_samples_per_second": marginal,
                       "startup_seconds_estimate": (small_s - n_small / marginal) if marginal else None}
    one, two = (result[k] for k in result)
    speedup = {"wall": two["samples_per_second"] / one["samples_per_second"],
               "marginal": (two["marginal_samples_per_second"] / one["marginal_samples_per_second"])
               if one["marginal_samples_per_second"] and two["marginal_samples_per_second"] else None}
    return {"configs": result, "speedup_2_over_1": speedup, "small_samples": n_small}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=160, help="Synthetic training samples extracted per pass.")
    p.add_argument("--batch-size", type=int, default=4, help="(tiny_teacher.py's bevcache.batch_size)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers, the same for every path.")
    p.add_argument("--chunk-rows", type=int, default=16, help="Store block size (small: both ranks get blocks).")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="Threads of the 1-process torchrun run, split over 2 processes in the other "
                        "[default: torch's thread count here, i.e. OMP_NUM_THREADS; make bench sets 2].")
    p.add_argument("--parts", default="inproc,torchrun", help="Which parts to run: inproc, torchrun.")
    args = p.parse_args()
    if args.quick:
        args.samples, args.batch_size, args.workers, args.chunk_rows, args.reps = 12, 2, 0, 2, 1
    parts = set(args.parts.split(","))
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    warn_if_busy()
    mach = machine()
    work = Path(args.work) / ("quick" if args.quick else "")
    data = synth_data(work, args.samples, 2)
    warm_data = synth_data(Path(args.work) / "quick", 8, 2)
    ckpt = random_teacher_checkpoint(work)
    import torch

    n = args.samples
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU {mach['cpu_model']} ({torch.get_num_threads()} threads)"
    result: dict = {"samples": n}
    if "inproc" in parts:
        r = result["in_process"] = in_process(args, work, data, warm_data, ckpt, n)
        rows = [[name, f"{r['paths'][key]['samples_per_second']:.2f}", fmt_time(r["paths"][key]["seconds"]["median"]),
                 fmt_time(r["paths"][key]["seconds"]["iqr"]),
                 f"{r['paths'][key]['samples_per_second'] / r['paths']['neck']['samples_per_second']:.3f}"]
                for name, key in (("bevcache extract (writes a store)", "extract"),
                                  ("bare loop, extract_feat to pts_neck", "neck"),
                                  ("bare loop, full predict", "predict"))]
        print(f"\n### Extraction throughput, tiny teacher, {n} samples, batch {args.batch_size}, "
              f"{args.workers} loader workers, {args.reps} reps, on {dev}\n")
        print(table(["path", "samples/s", "s/pass median", "IQR", "vs bare neck"], rows))
        ratio = r["ratio_extract_over_bare_neck"]["of_medians"]
        print(f"\n- extract / bare neck: {ratio:.3f} (target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")
        print(f"- extract / bare predict: {r['ratio_extract_over_bare_predict']:.3f}")
        print(f"- extract wall per call (build, probe, store creation included): "
              f"{fmt_time(r['paths']['extract']['wall_seconds']['median'])}; "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB")
    if "torchrun" in parts:
        r = result["torchrun"] = torchrun(args, work, data, warm_data, ckpt, n, 8)
        if "skipped" in r:
            print(f"\n- torchrun comparison skipped: {r['skipped']}")
        else:
            rows = [[k, f"{v['samples_per_second']:.2f}", fmt_time(v["wall_seconds"]["median"]),
                     fmt_time(v["wall_seconds"]["iqr"]),
                     f"{v['marginal_samples_per_second']:.2f}" if v["marginal_samples_per_second"] else "-",
                     fmt_time(v["startup_seconds_estimate"])] for k, v in r["configs"].items()]
            print(f"\n### `bevcache extract` under torchrun, {n} samples (and {r['small_samples']} for the start-up)\n")
            print(table(["processes x threads", "samples/s (wall)", "wall median", "IQR",
                         "samples/s (marginal)", "start-up"], rows))
            sp = r["speedup_2_over_1"]
            marginal = f"{sp['marginal']:.2f}x" if sp["marginal"] else "-"
            print(f"\n- 2 processes / 1 process: {sp['wall']:.2f}x wall clock, {marginal} without start-up")
    write_result(NAME, args, result, mach)


if __name__ == "__main__":
    main()
