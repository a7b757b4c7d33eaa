"""Spatial teacher cache: bytes per sample, extraction rate, training step with maps read by loader workers.

Three parts, each measured side by side in this run:

1. **Store size** of 512-channel `pts_neck` maps at grids 45 and 90: real maps of the trained tiny
   teacher (bench_fidelity.py trains it; `--quick` and a missing checkpoint fall back to a random
   one, and say so), run over a 73.6 m x 73.6 m extent at its own 0.4 m pillars so that its neck is
   92 x 92 (a 90 x 90 neck is impossible: the SECOND backbone needs a multiple of 8 pillars), pooled
   to 90 and 45 by extraction's own adaptive average pooling;
   float16, the store's sharded layout and codecs. Projected to nuScenes (28,130 train samples)
   and Waymo (158,081 train frames) by bytes/sample.
2. **Extraction rate** with spatial layers against pooled only: `bevcache.extract.extract` of the
   same teacher over the same samples, pooled only / + `--spatial pts_neck=45` / + `pts_neck=90`,
   interleaved repetitions in this process, extract's own loop clock (loader + teacher + writes).
3. **Training step** of the tiny student with cached CRD + spatial maps (configs/tiny_student_crd.py,
   `spatial=dict(...)`, `augmentation='warp'`, TeacherRowsDataset) against the plain student, both
   on the teacher's augmented train pipeline with 2 loader workers, through Runner.from_cfg, one
   epoch of an EpochBasedTrainLoop (warm-up + timed iterations = one pass); the maps come from local disk, and from the S3 test server (moto on
   127.0.0.1, started by this script, as tests/test_remote_store.py does; it shares the CPU with the
   run). Each variant runs in its own process, interleaved (rotating order). Two clocks: the
   *iteration* (after_train_iter to after_train_iter: includes waiting for the loader, which reads
   and decodes the maps on the same 2 cores) and the *step* (train_step only). Peak RSS of the main
   process and of the largest loader worker (VmHWM).
   Variants of the distilled step: `local` (the loader workers read, warp and weigh each sample's
   map: TeacherRowsDataset(prepare=...)), `memory` (the same with every map already in memory, read
   once before the workers fork: what remains without the store's I/O), `main` (maps read by the
   workers, warped and weighed on the main process inside the step: the path before the workers
   prepared them), `s3`, `local90`. The ratios that matter: local/memory (the I/O's share) and
   local/plain, side by side in one run.
4. **Components**: where a distilled step's time goes. Per sample in a loader worker, on the training
   store: the student's own pipeline, the store read (read + decode + checksum), the Blosc decode and
   the CRC32C alone (and other codecs' decode time and size on the same maps), the warp, the
   foreground heatmap. Per batch on the main process: stacking the prepared fields, the loss forward
   + backward (the current formulation and the plain-autograd one it replaced), and the warp +
   foreground the main process used to do; at grids 45 and 90.

    .venv/bin/python benchmarks/bench_spatial.py                 # alone on the machine
    .venv/bin/python benchmarks/bench_spatial.py --quick         # smoke test
    .venv/bin/python benchmarks/bench_spatial.py --parts store   # one part (store, train, components)
    .venv/bin/python benchmarks/bench_spatial.py --parts train,components --variants plain,local,memory,main
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

from common import (
    REPO,
    STUDENT_CFG,
    TEACHER_CFG,
    fmt_bytes,
    fmt_stat,
    fmt_time,
    machine,
    parser,
    random_teacher_checkpoint,
    run_child,
    stats,
    sync,
    synth_data,
    table,
    warn_if_busy,
    write_result,
)

NAME = "spatial"
LAYER = "pts_neck"
DATASETS = {"nuScenes (28,130 train samples)": 28130, "Waymo (158,081 train frames)": 158081}
VARIANTS = ("plain", "local", "memory", "main", "s3")
LABELS = {"plain": "(a) plain student", "local": "(b) CRD + spatial maps, local disk, prepared by the workers",
          "memory": "(c) as (b), maps already in memory (no store reads)",
          "main": "(d) as (b), warp + foreground on the main process",
          "s3": "(e) CRD + spatial maps, S3 (moto, 127.0.0.1)", "local90": "(f) CRD + spatial maps at 90, local disk"}
WIDE_HALF = 36.8  # m: a 73.6 m square at 0.4 m pillars = 184 pillars (SECOND needs a multiple of 8), neck 92 x 92


def rel(path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def teacher_weights(work: Path, quick: bool, epochs: int) -> tuple[Path, str]:
    """The trained tiny teacher of bench_fidelity.py if it exists (never trained here), else a random one."""
    trained = Path(work) / "fidelity" / f"teacher-e{epochs}-data-100-16-s0" / f"epoch_{epochs}.pth"
    if not quick and trained.is_file():
        return trained, f"trained ({rel(trained)}, bench_fidelity.py)"
    return random_teacher_checkpoint(work), "random init (run bench_fidelity.py first for a trained teacher)"


def wide_teacher_config(work: Path) -> Path:
    """configs/tiny_teacher.py over a 73.6 m square at the same 0.4 m pillars: pts_neck is 92 x 92."""
    from bevcache.runtime import load_config

    cfg = load_config(TEACHER_CFG)
    h = WIDE_HALF
    pcr = [-h, -h, -5.0, h, h, 3.0]
    pillars = int(round(2 * h / 0.4))
    m = cfg.model
    m.data_preprocessor.voxel_layer.point_cloud_range = pcr
    m.data_preprocessor.voxel_layer.max_voxels = (60000, 60000)
    m.pts_voxel_encoder.point_cloud_range = pcr
    m.pts_middle_encoder.output_shape = [pillars, pillars]
    m.train_cfg.pts.grid_size = [pillars, pillars, 1]
    m.train_cfg.pts.point_cloud_range = pcr
    for key in ("test_pipeline", "train_pipeline", "augmented_train_pipeline"):
        for step in cfg[key]:
            if "point_cloud_range" in step:
                step["point_cloud_range"] = pcr
    cfg.test_dataloader.dataset.pipeline = cfg.test_pipeline
    cfg.val_dataloader.dataset.pipeline = cfg.test_pipeline
    cfg.point_cloud_range = pcr
    path = Path(work) / "spatial" / "tiny_teacher_wide.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg.dump(str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Part 1 + 2: store size and extraction rate


def part_store(args, work: Path, mach: dict) -> dict:
    from bevcache.extract import ExtractOptions, extract

    data = synth_data(work, args.extract_samples, 2)
    ckpt, weights = teacher_weights(Path(args.work), args.quick, args.teacher_epochs)
    config = wide_teacher_config(work)
    variants = {"pooled": None, **{f"spatial{g}": f"{LAYER}={g}" for g in args.grids}}

    def run(name: str) -> dict:
        return extract(ExtractOptions(config=str(config), checkpoint=str(ckpt), out=str(work / "spatial" / f"extract-{name}.zarr"),
                                      data_root=str(data), spatial=variants[name], num_workers=args.extract_workers,
                                      batch_size=args.extract_batch, overwrite=True, progress=False))

    names = list(variants)
    run(names[0])  # warm-up: imports, model build, page cache
    seconds: dict[str, list[float]] = {n: [] for n in names}
    infos: dict[str, dict] = {}
    for rep in range(args.extract_reps):
        for name in names if rep % 2 == 0 else reversed(names):  # alternate the order against drift
            info = run(name)
            seconds[name].append(info["seconds"])
            infos[name] = info
            print(f"[bench] extract rep {rep + 1}/{args.extract_reps} {name}: {info['seconds']:.2f} s, "
                  f"{info['bytes_on_disk']} B", flush=True)
    n = args.extract_samples
    base = stats(seconds["pooled"])["median"]
    sizes = {}
    for g in args.grids:
        sp = infos[f"spatial{g}"]["spatial"][LAYER]
        per = sp["bytes_on_disk"] / n
        sizes[str(g)] = {"channels": sp["channels"], "grid": [sp["height"], sp["width"]], "bytes_on_disk": sp["bytes_on_disk"],
                         "bytes_raw": sp["bytes_raw"], "bytes_per_sample": per, "raw_per_sample": sp["bytes_raw"] / n,
                         "compression": sp["bytes_raw"] / sp["bytes_on_disk"],
                         "store_bytes_per_sample": infos[f"spatial{g}"]["bytes_on_disk"] / n,
                         "projected_bytes": {k: per * v for k, v in DATASETS.items()}}
    extraction = {name: {"seconds": stats(seconds[name]), "samples_per_s": n / stats(seconds[name])["median"],
                         "time_ratio_vs_pooled": stats(seconds[name])["median"] / base,
                         "bytes_on_disk": infos[name]["bytes_on_disk"]} for name in names}

    dev = mach["cuda"]["device"] if mach["cuda"] else f"CPU {mach['cpu_model']}"
    print(f"\n### Spatial store size, 512-channel pts_neck float16, real maps of the tiny teacher ({weights}) "
          f"over a 73.6 m square (neck 92 x 92), {n} synthetic samples\n")
    rows = []
    for g in args.grids:
        s = sizes[str(g)]
        rows.append([f"{g} x {g}", fmt_bytes(s["raw_per_sample"]), fmt_bytes(s["bytes_per_sample"]), f"{s['compression']:.2f}",
                     *[fmt_bytes(v) for v in s["projected_bytes"].values()]])
    print(table(["grid", "raw / sample", "on disk / sample", "compression", *[f"projected: {k}" for k in DATASETS]], rows))
    print(f"\n### Extraction with spatial layers vs pooled only, same teacher (73.6 m, neck 92 x 92), {n} samples, "
          f"batch {args.extract_batch}, {args.extract_workers} loader worker(s), {args.extract_reps} reps, {dev}\n")
    rows = [[name, fmt_time(extraction[name]["seconds"]["median"]), fmt_time(extraction[name]["seconds"]["iqr"]),
             f"{extraction[name]['samples_per_s']:.2f}", f"{extraction[name]['time_ratio_vs_pooled']:.3f}",
             fmt_bytes(extraction[name]["bytes_on_disk"] / n)] for name in names]
    print(table(["variant", "loop time median", "IQR", "samples/s", "time vs pooled", "store B/sample"], rows))
    return {"samples": n, "teacher": weights, "teacher_config": rel(config), "sizes": sizes, "extraction": extraction,
            "runs": {k: v for k, v in seconds.items()}}


# ---------------------------------------------------------------------------------------------
# Part 3: training step (children)


def _vm_hwm_kib(pid: int | str = "self") -> int:
    """Peak RSS (VmHWM) of a process. Not getrusage's ru_maxrss: that survives exec, so a child started
    by this (large) parent would report the parent's peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _worker_peaks_kib() -> list[int]:
    """VmHWM (peak RSS) of this process's live children: the loader workers."""
    peaks = []
    for children in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                peaks.append(_vm_hwm_kib(pid))
            except OSError:
                pass
    return peaks


def register_in_memory_rows() -> str:
    """A TeacherRowsDataset whose worker reads every map once, at its first sample: then the distilled
    step without the store's reads."""
    from mmdet3d.registry import DATASETS

    from bevcache.loading import TeacherRowsDataset

    class InMemoryRowsDataset(TeacherRowsDataset):
        maps: dict | None = None

        def read_map(self, layer, row, view=0):
            if self.maps is None:  # each worker reads every map once, at its first sample (in the warm-up)
                store = self._opened()
                self.maps = {name: store.read_spatial(name, range(store.num_samples)) for name in self.spatial}
            return self.maps[layer][row]

    DATASETS.register_module(name="BenchInMemoryRowsDataset", module=InMemoryRowsDataset, force=True)
    return "BenchInMemoryRowsDataset"


def child(args) -> None:
    t_start = time.perf_counter()
    load_start = list(os.getloadavg())
    import torch
    from mmengine.config import Config
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    from bevcache.data import set_data_root
    from tests.conftest import iteration_run  # the suite's short-run helper

    spatial = args.child != "plain"
    cfg = Config.fromfile(str(REPO / "configs" / ("tiny_student_crd.py" if spatial else STUDENT_CFG.name)))
    set_data_root(cfg, args.data_root)
    cfg.train_dataloader.dataset.pipeline = [dict(s) for s in cfg.augmented_train_pipeline]
    if spatial:
        cfg.model.update(cache=args.store, augmentation="warp", spatial=dict(layers={LAYER: LAYER}))
    cfg = iteration_run(cfg, work_dir=Path(args.work) / "spatial" / "runs" / args.child, iters=args.warmup + args.iters,
                        batch_size=args.batch_size, workers=args.workers, seed=args.seed)
    # One epoch of an EpochBasedTrainLoop: its loader workers start after before_train, so neither
    # variant pays DistillationHook's restart of an IterBasedTrainLoop's loader inside the timing.
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=1, val_interval=10**9)
    cfg.train_dataloader.sampler = dict(type="DefaultSampler", shuffle=True)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=10)
    cfg.log_processor = dict(type="LogProcessor", window_size=10, by_epoch=False)
    if spatial:
        pcr = cfg.point_cloud_range
        prepare = None if args.child == "main" else dict(bev_range=(pcr[0], pcr[1], pcr[3], pcr[4]), warp=True)
        kind = "TeacherRowsDataset"
        if args.child == "memory":
            kind = register_in_memory_rows()
        cfg.train_dataloader.dataset = dict(type=kind, dataset=cfg.train_dataloader.dataset, cache=args.store,
                                            spatial=[LAYER], prepare=prepare)

    class Clock:
        def __init__(self):
            self.t0 = self.last = self.first = None
            self.steps, self.iterations, self.worker_kib = [], [], 0

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            sync()
            self.t0 = time.perf_counter()
            if self.first is None:
                self.first = self.t0

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            sync()
            now = time.perf_counter()
            self.steps.append(now - self.t0)
            if self.last is not None:
                self.iterations.append(now - self.last)
            self.last = now
            if runner.iter % 5 == 0:
                self.worker_kib = max([self.worker_kib, *_worker_peaks_kib()])

    class StepStart(Hook):  # before_train_iter last, after_train_iter first: the clock hugs train_step
        def __init__(self, clock):
            self.clock = clock

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            self.clock.before_train_iter(runner, batch_idx, data_batch)

    clock = Clock()
    runner = Runner.from_cfg(cfg)
    runner.register_hook(StepStart(clock), priority="LOWEST")

    class StepEnd(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            clock.after_train_iter(runner, batch_idx, data_batch, outputs)

    runner.register_hook(StepEnd(), priority="HIGHEST")
    if len(runner.train_dataloader) < args.warmup + args.iters:
        sys.exit(f"{len(runner.train_dataloader)} batches per epoch < {args.warmup} warm-up + {args.iters} timed: "
                 "more --train-samples")
    runner.train()
    worker_kib = max([clock.worker_kib, *_worker_peaks_kib()])
    result = {
        "variant": args.child,
        "loadavg": [load_start, list(os.getloadavg())],
        "step_seconds": clock.steps[args.warmup:],
        "iteration_seconds": clock.iterations[args.warmup:],  # iteration i ends at after_train_iter i
        "setup_seconds": (clock.first or time.perf_counter()) - t_start,
        "peak_rss_mib": _vm_hwm_kib() / 1024,
        "worker_peak_rss_mib": worker_kib / 1024,
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.child_out).write_text(json.dumps(result))


class S3Server:
    """moto's S3 server on a free 127.0.0.1 port with the AWS_* environment pointing at it."""

    def __enter__(self):
        import logging

        import moto.server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.server = moto.server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.env = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        os.environ.update(self.env)
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        return self

    def upload(self, local: Path, name: str) -> str:
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.put(str(local), f"bench/{name}", recursive=True)
        return f"s3://bench/{name}"

    def __exit__(self, *exc):
        self.server.stop()
        for key in self.env:
            os.environ.pop(key, None)


def training_stores(args, work: Path, grids: set[int]) -> tuple[Path, dict[int, Path], str]:
    """(data root, {grid: store}, teacher description) of the training runs, extracted once and reused."""
    from bevcache.extract import ExtractOptions, extract
    from bevcache.store import open_store, store_exists

    data = synth_data(work, args.train_samples, max(2, args.train_samples // 8))
    ckpt, weights = teacher_weights(Path(args.work), args.quick, args.teacher_epochs)
    stores = {}
    for g in sorted(grids):
        out = work / "spatial" / f"train-store-{data.name}-g{g}-{'trained' if 'trained' in weights else 'random'}.zarr"
        if not (store_exists(str(out)) and open_store(str(out)).complete_mask().all()):
            print(f"[bench] extracting the training store pts_neck={g} -> {out}", flush=True)
            extract(ExtractOptions(config=str(TEACHER_CFG), checkpoint=str(ckpt), out=str(out), data_root=str(data),
                                   spatial=f"{LAYER}={g}", num_workers=0, overwrite=True, progress=False))
        stores[g] = out
    return data, stores, weights


def part_train(args, work: Path, mach: dict) -> dict:
    data, stores, weights = training_stores(args, work, {args.train_grid, 90} if "local90" in args.variants
                                            else {args.train_grid})
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    common = ["--work", str(work), "--data-root", str(data), "--batch-size", str(args.batch_size), "--workers",
              str(args.workers), "--warmup", str(args.warmup), "--iters", str(args.iters), "--seed", str(args.seed)]
    with S3Server() as s3:
        url = s3.upload(stores[args.train_grid], f"train-g{args.train_grid}.zarr") if "s3" in args.variants else None
        local = stores[args.train_grid]
        where = {"plain": local, "local": local, "memory": local, "main": local, "s3": url, "local90": stores.get(90)}
        for rep in range(args.reps):
            order = args.variants[rep % len(args.variants):] + args.variants[:rep % len(args.variants)]
            for variant in order:
                out = work / "spatial" / "runs" / f"{variant}-rep{rep}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                run_child([__file__, "--child", variant, "--child-out", str(out), "--store", str(where[variant]), *common],
                          env=s3.env)
                runs[variant].append(json.loads(out.read_text()))
                r = runs[variant][-1]
                print(f"[bench] rep {rep + 1}/{args.reps} {variant:<7}: median iteration "
                      f"{statistics.median(r['iteration_seconds']):.3f} s, step {statistics.median(r['step_seconds']):.3f} s "
                      f"({time.perf_counter() - t0:.0f} s run)", flush=True)
    summary = {}
    for v in args.variants:
        summary[v] = {
            "iteration": stats([t for r in runs[v] for t in r["iteration_seconds"]]),
            "step": stats([t for r in runs[v] for t in r["step_seconds"]]),
            "per_rep_iteration": [statistics.median(r["iteration_seconds"]) for r in runs[v]],
            "per_rep_step": [statistics.median(r["step_seconds"]) for r in runs[v]],
            # the loader's share: how long each iteration waited for its batch beyond train_step
            "data_wait": stats([max(0.0, it - st) for r in runs[v]
                                for it, st in zip(r["iteration_seconds"], r["step_seconds"][1:], strict=False)]),
            "loadavg": [r.get("loadavg") for r in runs[v]],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs[v]),
            "worker_peak_rss_mib": max(r["worker_peak_rss_mib"] for r in runs[v]),
            "setup": stats([r["setup_seconds"] for r in runs[v]]),
        }

    def ratio(a: str, clock: str, b: str = "plain") -> dict:
        per = [x / y for x, y in zip(summary[a][f"per_rep_{clock}"], summary[b][f"per_rep_{clock}"], strict=True)]
        return {"of_medians": summary[a][clock]["median"] / summary[b][clock]["median"], "per_rep": per,
                "min": min(per), "max": max(per)}

    ratios = {f"{v}/plain": {c: ratio(v, c) for c in ("iteration", "step")} for v in args.variants if v != "plain"}
    for a, b in (("local", "memory"), ("main", "local")):
        if a in args.variants and b in args.variants:
            ratios[f"{a}/{b}"] = {c: ratio(a, c, b) for c in ("iteration", "step")}
    dev = mach["cuda"]["device"] if mach["cuda"] else f"CPU {mach['cpu_model']} ({mach['torch_threads']} threads)"
    print(f"\n### Training step with spatial maps read by {args.workers} loader workers vs the plain student, tiny student, "
          f"batch {args.batch_size}, {args.train_samples} samples, maps 512 x {args.train_grid} x {args.train_grid} float16, "
          f"{args.reps} x {args.iters} timed iterations after {args.warmup} warm-up, on {dev}\n")
    rows = []
    for v in args.variants:
        s = summary[v]
        rel_it = f"{s['iteration']['median'] / summary['plain']['iteration']['median']:.3f}"
        rel_st = f"{s['step']['median'] / summary['plain']['step']['median']:.3f}"
        rows.append([LABELS[v], fmt_stat(s["iteration"]), rel_it, fmt_stat(s["step"]), rel_st,
                     fmt_time(s["data_wait"]["median"]), f"{s['peak_rss_mib']:.0f}", f"{s['worker_peak_rss_mib']:.0f}"])
    print(table(["variant", "iteration median (IQR)", "vs plain", "train_step median (IQR)", "vs plain",
                 "waits for data (median)", "peak RSS MiB (main)", "peak RSS MiB (worker)"], rows))
    print()
    goals = {"local/memory": 1.05, "local/plain": 1.10}
    for key, r in ratios.items():
        it = r["iteration"]
        goal = goals.get(key)
        verdict = "" if goal is None else f" (goal <= {goal}: " + ("met" if it["of_medians"] <= goal else "NOT met") + \
            ", by the iteration clock)"
        print(f"- {key}: iteration {it['of_medians']:.3f} (per repetition {it['min']:.3f}..{it['max']:.3f}), "
              f"train_step {r['step']['of_medians']:.3f}{verdict}")
    print(f"- distilled variants: cached CRD (pts_neck) + spatial MSE with the warp; teacher {weights}; the S3 server "
          "runs in the benchmark's process on the same CPU.")
    return {"train_samples": args.train_samples, "grid": args.train_grid, "teacher": weights, "variants": summary,
            "ratios": ratios, "runs": runs}


# ---------------------------------------------------------------------------------------------
# Part 4: where the distilled step's extra time goes


def _codecs() -> dict:
    """Blosc settings to compare on the same maps; the store's own is the first."""
    from numcodecs import Blosc

    return {"zstd 5, bitshuffle (the store's)": Blosc(cname="zstd", clevel=5, shuffle=Blosc.BITSHUFFLE),
            "zstd 1, bitshuffle": Blosc(cname="zstd", clevel=1, shuffle=Blosc.BITSHUFFLE),
            "lz4 5, bitshuffle": Blosc(cname="lz4", clevel=5, shuffle=Blosc.BITSHUFFLE),
            "lz4 5, byte shuffle": Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE),
            "none (raw float16)": None}


def loader_pieces(args, work: Path) -> dict:
    """Per sample, in this process as a loader worker does it, on the training store (grid
    args.train_grid): what a worker adds to the student's own pipeline."""
    import numpy as np
    import torch
    from crc32c import crc32c
    from mmengine.config import Config

    from bevcache.data import build_base_dataset, set_data_root
    from bevcache.loading import SpatialPrep, TeacherRowsDataset, prepare_maps
    from bevcache.runtime import setup_runtime
    from bevcache.warp import augmentation_order, bev_transform, gaussian_foreground, warp_bev

    data, stores, _ = training_stores(args, work, {args.train_grid})
    setup_runtime()  # mmdet3d's registries as the default scope (extraction sets it only when it runs)
    cfg = Config.fromfile(str(REPO / "configs" / "tiny_student_crd.py"))
    set_data_root(cfg, str(data))
    base = build_base_dataset(cfg, "train", pipeline=[dict(s) for s in cfg.augmented_train_pipeline])
    pcr = cfg.point_cloud_range
    prep = SpatialPrep(bev_range=(pcr[0], pcr[1], pcr[3], pcr[4]), warp=True,
                       order=augmentation_order([type(t).__name__ for t in base.pipeline.transforms]))
    rows = TeacherRowsDataset(base, str(stores[args.train_grid]), spatial=[LAYER])
    n = min(len(base), 6 if args.quick else 24)
    times: dict[str, list[float]] = {}

    def clock(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    codecs = _codecs()
    sizes: dict[str, list[int]] = {name: [] for name in codecs}
    rows.read_map(LAYER, 0)  # opens the store (once per worker)
    for i in range(n):
        packed = clock("student pipeline (points, augmentation, packing)", lambda i=i: base[i])
        sample = packed["data_samples"]
        row = int(sample.metainfo["sample_idx"])
        value = clock("store read (read + decode + CRC32C)", lambda row=row: rows.read_map(LAYER, row))
        raw = value.tobytes()
        for name, codec in codecs.items():
            encoded = raw if codec is None else codec.encode(raw)
            sizes[name].append(len(encoded))
            clock(f"decode: {name}", (lambda e=encoded: bytes(e)) if codec is None else (lambda c=codec, e=encoded: c.decode(e)))
        encoded = codecs["zstd 5, bitshuffle (the store's)"].encode(raw)
        clock("CRC32C of the stored chunk", lambda e=encoded: crc32c(e))
        transform = torch.as_tensor(bev_transform(sample.metainfo, prep.order)[None], dtype=torch.float32)
        teacher = torch.from_numpy(value)[None]
        clock("warp (bev_transform + warp_bev)", lambda t=teacher, a=transform: warp_bev(t.float(), a, prep.bev_range))
        clock("foreground heatmap", lambda s=sample, hw=value.shape[-2:]: gaussian_foreground(
            s.gt_instances_3d.bboxes_3d, prep.bev_range, hw, min_radius=prep.min_radius, overlap=prep.overlap))
        clock("prepare_maps (warp + foreground + fields)", lambda s=sample, v=value: prepare_maps(s, {LAYER: v}, prep))
    out = {name: stats(ts) for name, ts in times.items()}
    codec_sizes = {name: float(np.median(s)) for name, s in sizes.items()}
    print(f"\n### Per sample in a loader worker, training store {args.train_grid} x {args.train_grid} x 512 float16, "
          f"{n} samples, median\n")
    print(table(["piece", "median", "IQR"], [[k, fmt_time(v["median"]), fmt_time(v["iqr"])] for k, v in out.items()]))
    print("\n" + table(["codec (same maps)", "bytes / map", "decode median"],
                       [[name, fmt_bytes(codec_sizes[name]), fmt_time(out[f"decode: {name}"]["median"])] for name in codecs]))
    return {"samples": n, "pieces": out, "codec_bytes_per_map": codec_sizes}


def part_components(args, work: Path, mach: dict) -> dict:
    """The spatial pieces of one distilled step alone, at the training batch size, and per sample in a worker."""
    import numpy as np
    import torch
    from common import time_repeated

    from bevcache.spatial import SpatialDistillLoss
    from bevcache.warp import gaussian_foreground, warp_bev

    torch.manual_seed(0)
    b, rng = args.batch_size, (-25.6, -25.6, 25.6, 25.6)
    student = torch.randn(b, 256, 64, 64, requires_grad=True)  # the tiny student's pts_neck
    c, s = np.cos(0.2), np.sin(0.2)
    rotation = torch.tensor([[[c, -s, 0], [s, c, 0], [0, 0, 1]]] * b, dtype=torch.float32)
    flip = torch.tensor([[[1, 0, 0], [0, -1, 0], [0, 0, 1]]] * b, dtype=torch.float32)
    boxes = torch.cat([torch.rand(25, 2) * 40 - 20, torch.zeros(25, 1), torch.rand(25, 3) * 3 + 0.5,
                       torch.zeros(25, 1)], 1)  # 25 boxes per sample (the synthetic scenes have ~20)
    reps = 3 if args.quick else 20

    def pieces(g: int) -> dict:
        teacher = torch.randn(b, 512, g, g).half()
        warped, valid = warp_bev(teacher.float(), rotation, rng)
        fg = torch.stack([gaussian_foreground(boxes, rng, (g, g)) for _ in range(b)])
        loss = SpatialDistillLoss(256, 512)
        fields = [(warped[i].clone(), valid[i].clone(), fg[i].clone()) for i in range(b)]  # as the workers send them

        def step(forward):
            def run():
                student.grad = None
                loss.zero_grad()
                forward(student, warped, valid, fg)["feat"].backward()
            return run

        return {
            "main: stack the prepared maps, valid masks, heatmaps": lambda: [torch.stack(list(x)) for x in zip(*fields, strict=True)],
            "main: SpatialDistillLoss fwd + bwd": step(loss.forward),
            "main: the same, autograd formulation (before)": step(loss._forward_autograd),
            "(before) main: warp_bev, rotation (bilinear)": lambda: warp_bev(teacher.float(), rotation, rng),
            "(before) main: warp_bev, flip (index copy)": lambda: warp_bev(teacher.float(), flip, rng),
            "(before) main: gaussian_foreground x batch": lambda: [gaussian_foreground(boxes, rng, (g, g)) for _ in range(b)],
        }

    batch = {}
    for g in args.grids:
        fns = pieces(g)
        names = list(fns)
        times: dict[str, list[float]] = {n: [] for n in names}
        for name in names:  # warm-up
            time_repeated(fns[name], warmup=1, repeats=1)
        for rep in range(reps):  # interleaved, so contention drifts alike over all pieces
            for name in names if rep % 2 == 0 else reversed(names):
                times[name] += time_repeated(fns[name], warmup=0, repeats=1)
        batch[str(g)] = {name: stats(ts) for name, ts in times.items()}
    print(f"\n### Spatial pieces on the main process, batch {args.batch_size}, student 256 x 64 x 64 -> "
          f"teacher 512 x g x g, {reps} interleaved repetitions, median\n")
    names = list(batch[str(args.grids[0])])
    print(table(["piece", *[f"grid {g}" for g in args.grids]],
                [[n, *[fmt_time(batch[str(g)][n]["median"]) for g in args.grids]] for n in names]))
    return {"batch": batch, "loader": loader_pieces(args, work)}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--parts", default="store,train,components",
                   help="Comma-separated: store (size + extraction), train, components (the spatial pieces alone).")
    p.add_argument("--teacher-epochs", type=int, default=6, help="(bench_fidelity.py's trained teacher, if present)")
    p.add_argument("--grids", default="45,90")
    p.add_argument("--extract-samples", type=int, default=48)
    p.add_argument("--extract-batch", type=int, default=4)
    p.add_argument("--extract-workers", type=int, default=1)
    p.add_argument("--extract-reps", type=int, default=2)
    p.add_argument("--train-samples", type=int, default=120, help="One epoch: >= (warm-up + iters) x batch size.")
    p.add_argument("--train-grid", type=int, default=45)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="Loader workers (both variants).")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=25)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"Of {list(LABELS)}; plain is always run.")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--child", choices=list(LABELS), help="(internal) run one variant and write --child-out")
    p.add_argument("--child-out")
    p.add_argument("--data-root")
    p.add_argument("--store")
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.extract_samples, args.extract_reps, args.train_samples = 6, 1, 8
        args.warmup, args.iters, args.reps, args.batch_size = 1, 3, 1, 2  # 4 batches of 2 = 8 samples
    args.grids = [int(g) for g in str(args.grids).split(",")]
    args.variants = ["plain"] + [v for v in args.variants.split(",") if v and v != "plain"]
    unknown = set(args.variants) - set(LABELS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; known: {list(LABELS)}")
    parts = [x for x in args.parts.split(",") if x]
    warn_if_busy()
    mach = machine()
    work = Path(args.work) / ("quick" if args.quick else "")
    result = {}
    if "store" in parts:
        result["store"] = part_store(args, work, mach)
    if "train" in parts:
        result["train"] = part_train(args, work, mach)
    if "components" in parts:
        result["components"] = part_components(args, work, mach)
    args.work = rel(args.work)
    path = write_result(NAME, args, result, mach)
    if str(REPO) in path.read_text():
        sys.exit(f"{path} holds the machine path {REPO}: fix the benchmark before committing it")


if __name__ == "__main__":
    main()
