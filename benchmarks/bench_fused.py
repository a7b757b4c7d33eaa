"""The fused camera + LiDAR teacher on CPU: online / cached distillation iteration, its breakdown, bytes read per sample, extraction vs a bare forward.

The tiny fused teacher (configs/tiny_fused_teacher.py: BEVFusion's structure, six 384x216 cameras
+ LiDAR, random weights with BN statistics perturbed) distilled into the tiny voxel LiDAR student
(configs/tiny_voxel_student.py) on `bevcache.synth.generate(cameras=True)` data, batch 2,
`--threads` torch threads, loader in the main process (num_workers=0, so its time is attributable).

1. Training, each variant in its own process (peak RSS is its own), interleaved and rotated over
   repetitions: (a) the student + CRD against the teacher's pooled pts_neck store (`cached`), and
   (b) the same with the fused teacher run every step (`online`: one loader loads images + points,
   the student never sees `img`). Per timed iteration: the whole iteration (consecutive
   `after_train_iter`, so the loader's fetch, hooks and logging count), the loader's fetch alone
   (the loop's iterator, timed), and the train step (`before_train_iter` last hook to
   `after_train_iter` first hook). Breakdown, timed inside the same runs by wrapping the objects'
   `forward`/methods/transforms on the instances (time stamps around each call, no extra forward):
   the loader's pipeline steps (image load = read + JPEG decode of six cameras, point steps, packing),
   the teacher's data preprocessor (image normalisation vs voxelisation), its camera branch
   (`extract_img_bev`: img_backbone + img_neck + camera matrices + view_transform), its LiDAR branch
   (`extract_lidar_bev`: pts_voxel_encoder + pts_middle_encoder), and the rest (fusion_layer,
   pts_backbone, pts_neck, pooling); the student's own step = train step - teacher features.
2. Bytes read per sample by the student's loader: every file mmengine's LocalBackend.get returns
   (points, sweeps, JPEGs) counted by kind during the timed iterations, checked against the process's
   read(2) bytes (/proc/self/io rchar) around each fetch; the cached run also reads the store's pooled
   table once when it is built (its bytes on disk / samples).
3. Extraction, in one process, interleaved: `bevcache.extract.extract` (its own loop time: loader +
   teacher + pooling + writes) vs a bare loop over the same loader and teacher, `model.extract_feat`
   (images + voxels -> pts_neck), average-pooled to host memory. Seconds/sample.

    .venv/bin/python benchmarks/bench_fused.py           # alone on the machine, ~8 min on 2 cores
    .venv/bin/python benchmarks/bench_fused.py --quick   # smoke test, < 1 min
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from common import (
    CONFIGS,
    REPO,
    cuda_peak_mib,
    fmt_bytes,
    fmt_stat,
    fmt_time,
    machine,
    parser,
    peak_rss_mib,
    random_teacher_checkpoint,
    run_child,
    stats,
    sync,
    table,
    warn_if_busy,
    write_result,
)

NAME = "fused"
TEACHER_CFG = CONFIGS / "tiny_fused_teacher.py"
STUDENT_CFG = CONFIGS / "tiny_voxel_student.py"
VARIANTS = ("cached", "online")

# Teacher parts timed in the online run: name -> dotted attribute of the teacher (a module's forward or a method).
TEACHER_PARTS = {
    "preprocess": "data_preprocessor.forward", "voxelize": "data_preprocessor.voxelize",
    "camera": "extract_img_bev", "img_backbone": "img_backbone.forward", "img_neck": "img_neck.forward",
    "view_transform": "view_transform.forward",
    "lidar": "extract_lidar_bev", "pts_voxel_encoder": "pts_voxel_encoder.forward",
    "pts_middle_encoder": "pts_middle_encoder.forward",
    "fusion_layer": "fusion_layer.forward", "pts_backbone": "pts_backbone.forward", "pts_neck": "pts_neck.forward",
}
IMAGE_STEPS = ("LoadMultiViewImageFromFiles",)


# ---------------------------------------------------------------------------------------------
# Fixtures


def camera_data(work: Path, n_train: int, n_val: int) -> Path:
    root = work / f"data-{n_train}-{n_val}-cameras"
    if (root / "nuscenes_infos_val.pkl").is_file():
        return root
    from bevcache.synth import generate

    if root.exists():  # an interrupted generation: start over
        import shutil

        shutil.rmtree(root)
    print(f"[bench] synthetic data with cameras: {n_train} train / {n_val} val -> {root}", flush=True)
    generate(root, num_train=n_train, num_val=n_val, seed=0, cameras=True)
    return root


def extract_store(data: Path, ckpt: Path, out: Path, batch: int) -> dict:
    from bevcache.extract import ExtractOptions, extract

    info = extract(ExtractOptions(config=str(TEACHER_CFG), checkpoint=str(ckpt), out=str(out), data_root=str(data),
                                  batch_size=batch, num_workers=0, dtype="float16", overwrite=True, progress=False))
    if not info["complete"]:
        raise RuntimeError(f"extract left {out} incomplete")
    return info


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def table_bytes(store: Path, layer: str = "pts_neck") -> int:
    """Bytes on disk of the pooled layer's array (what read_table reads), found by name in the store."""
    dirs = [d for d in Path(store).rglob(layer) if d.is_dir() and not any(p.name == "spatial" for p in d.parents)]
    if not dirs:
        raise RuntimeError(f"no {layer!r} array under {store}")
    return dir_bytes(min(dirs, key=lambda d: len(d.parts)))


# ---------------------------------------------------------------------------------------------
# Child: one training variant, one Runner, instrumented


class Clock:
    """Per-iteration sums of named intervals; `on` only while the timed iterations run."""

    def __init__(self):
        self.cur: dict[str, float] = {}
        self.iters: list[dict[str, float]] = []
        self.bytes: dict[str, int] = {}
        self.on = False

    def add(self, name: str, seconds: float) -> None:
        self.cur[name] = self.cur.get(name, 0.0) + seconds

    def timed(self, name: str, fn):
        def wrapper(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:  # pts_neck's forward returns before the recorder's hook cuts the teacher short
                sync()
                self.add(name, time.perf_counter() - t0)

        return wrapper

    def flush(self) -> None:
        self.iters.append(self.cur)
        self.cur = {}


def rchar() -> int:
    """Bytes this process read through read(2)-family calls (page cache hits included)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def file_kind(path: str) -> str:
    p = path.replace("\\", "/").lower()
    if p.endswith((".jpg", ".jpeg", ".png")):
        return "images"
    if "/sweeps/" in p:
        return "sweeps"
    if "lidar_top" in p or p.endswith(".bin"):
        return "points"
    return "other"


def count_file_reads(clock: Clock) -> None:
    """Count the bytes of every file mmengine's local backend reads (points and JPEGs go through it)."""
    from mmengine.fileio.backends.local_backend import LocalBackend

    get = LocalBackend.get

    def counted(self, filepath):
        value = get(self, filepath)
        if clock.on:
            kind = file_kind(str(filepath))
            clock.bytes[kind] = clock.bytes.get(kind, 0) + len(value)
        return value

    LocalBackend.get = counted


class TimedStep:
    """A pipeline transform timed under its class name (Compose calls each in turn)."""

    def __init__(self, step, clock: Clock):
        self.step, self.clock, self.name = step, clock, "loader." + type(step).__name__

    def __call__(self, results):
        t0 = time.perf_counter()
        try:
            return self.step(results)
        finally:
            self.clock.add(self.name, time.perf_counter() - t0)

    def __repr__(self) -> str:
        return repr(self.step)


class TimedIterator:
    """The loop's data iterator, timed (fetch = dataset items + collate, in this process with 0 workers)."""

    def __init__(self, it, clock: Clock):
        self.it, self.clock, self.rchar = it, clock, 0

    def __iter__(self):
        return self

    def __next__(self):
        r0, t0 = rchar(), time.perf_counter()
        batch = next(self.it)
        self.clock.add("loader.fetch", time.perf_counter() - t0)
        if self.clock.on:
            self.rchar += rchar() - r0
        return batch


def instrument(runner, clock: Clock) -> None:
    from bevcache.data import base_dataset
    from bevcache.hooks import unwrap_model

    loop = runner.train_loop
    loop.dataloader_iterator = TimedIterator(loop.dataloader_iterator, clock)
    compose = base_dataset(runner.train_dataloader.dataset).pipeline
    compose.transforms = [TimedStep(t, clock) for t in compose.transforms]
    model = unwrap_model(runner.model)
    model._teacher_features = clock.timed("teacher.features", model._teacher_features)
    if model.teacher is not None:
        for name, dotted in TEACHER_PARTS.items():
            owner_path, _, attr = dotted.rpartition(".")
            owner = model.teacher.get_submodule(owner_path) if owner_path else model.teacher
            setattr(owner, attr, clock.timed("teacher." + name, getattr(owner, attr)))


def child(args) -> None:
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    from bevcache.train import TrainOptions, build_train_config
    from tests.conftest import iteration_run  # the suite's short-run helper

    clock = Clock()
    count_file_reads(clock)
    marks: dict[str, list[float]] = {"start": [], "end": []}

    class Start(Hook):
        def before_train(self, runner):  # after DistillationHook's before_train (it renews the loop's iterator)
            instrument(runner, clock)

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            clock.on = runner.iter >= args.warmup
            sync()
            marks["start"].append(time.perf_counter())

    class End(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            sync()
            marks["end"].append(time.perf_counter())
            clock.flush()

    opts = TrainOptions(student=str(STUDENT_CFG), data_root=args.data_root,
                        cache=args.store if args.child == "cached" else None,
                        teacher_online=str(TEACHER_CFG) if args.child == "online" else None,
                        teacher_checkpoint=args.checkpoint if args.child == "online" else None)
    cfg = build_train_config(opts)
    cfg = iteration_run(cfg, work_dir=Path(args.work) / "runs" / args.child, iters=args.warmup + args.iters,
                        batch_size=args.batch, workers=0, seed=args.seed)
    runner = Runner.from_cfg(cfg)
    runner.register_hook(Start(), priority="LOWEST")
    runner.register_hook(End(), priority="HIGHEST")
    t_train = time.perf_counter()
    runner.train()
    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    ends = [t_train, *marks["end"]]  # iteration i runs from the end of i-1 (the first: from train())
    timed = slice(args.warmup, None)
    samples = args.iters * args.batch
    result = {
        "variant": args.child,
        "iteration_seconds": [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)][timed],
        "step_seconds": [e - s for s, e in zip(marks["start"], marks["end"], strict=True)][timed],
        "parts": clock.iters[timed],  # per iteration: {part: seconds}
        "bytes_per_sample": {k: v / samples for k, v in clock.bytes.items()},
        "rchar_per_sample_in_loader": clock_rchar(runner) / samples,
        "teacher_inputs": list(getattr(model, "teacher_inputs", ())),
        "setup_seconds": t_train - t_start,
        "peak_rss_mib": peak_rss_mib(),
        "cuda_peak_mib": cuda_peak_mib(),
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.child_out).write_text(json.dumps(result))


def clock_rchar(runner) -> int:
    it = runner.train_loop.dataloader_iterator
    return it.rchar if isinstance(it, TimedIterator) else 0


# ---------------------------------------------------------------------------------------------
# Extraction vs a bare forward to pts_neck


class Bare:
    """The teacher, its extraction dataset and index batches, built once; a loop without bevcache's extras."""

    def __init__(self, data_root: Path, checkpoint: Path, batch: int):
        import bevcache.fusion  # noqa: F401
        from bevcache.data import build_base_dataset, set_data_root, test_pipeline
        from bevcache.runtime import load_config, resolve_device, setup_runtime
        from bevcache.teacher import build_teacher

        setup_runtime()
        cfg = load_config(TEACHER_CFG)
        set_data_root(cfg, str(data_root))
        self.model = build_teacher(cfg, str(checkpoint), resolve_device(None))
        self.dataset = build_base_dataset(cfg, "train", pipeline=test_pipeline(cfg))  # the camera test pipeline
        n = len(self.dataset)
        self.batches = [list(range(s, min(s + batch, n))) for s in range(0, n, batch)]

    def run(self) -> float:
        import torch

        from bevcache.extract import teacher_batches
        from bevcache.features import pool_output

        sync()
        t0 = time.perf_counter()
        for _, data in teacher_batches(self.model, self.dataset, self.batches, 0):
            with torch.inference_mode():
                metas = [s.metainfo for s in data["data_samples"]]
                _, neck = self.model.extract_feat(data["inputs"], metas)  # FusedCenterPoint: (None, pts_neck)
                pool_output(neck, "avg", len(metas)).float().cpu().numpy()
        sync()
        return time.perf_counter() - t0


class CoreTimer:
    """Times, inside extract()'s own loop, the work a bare loop also does: the loader's batches
    (teacher_batches: pipeline, collate, data preprocessor) and the forward + pooling
    (pooled_teacher_features). loop / core is then a paired estimate of extract / bare that
    load drift between passes cannot skew."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = {"batches": 0, "pooled": 0}  # the first of each is extract()'s probe, before its loop

    def _add(self, kind: str, seconds: float) -> None:
        if self.calls[kind] > 1:
            self.seconds += seconds

    def __enter__(self):
        import bevcache.extract as ex

        self.ex, self.saved = ex, (ex.teacher_batches, ex.pooled_teacher_features)
        batches, pooled = self.saved

        def timed_batches(*a, **k):
            self.calls["batches"] += 1
            it = batches(*a, **k)
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    self._add("batches", time.perf_counter() - t0)
                yield item

        def timed_pooled(*a, **k):
            self.calls["pooled"] += 1
            t0 = time.perf_counter()
            try:
                return pooled(*a, **k)
            finally:
                self._add("pooled", time.perf_counter() - t0)

        ex.teacher_batches, ex.pooled_teacher_features = timed_batches, timed_pooled
        return self

    def __exit__(self, *exc):
        self.ex.teacher_batches, self.ex.pooled_teacher_features = self.saved


def extraction(args, work: Path, data: Path, ckpt: Path, n: int) -> dict:
    reps = args.extract_reps
    import logging

    logging.getLogger("bevcache").setLevel(logging.WARNING)
    bare = Bare(data, ckpt, args.batch)
    if not args.quick:  # first-call costs of the bare loop paid untimed (extract's were paid by the store's extraction)
        batches, bare.batches = bare.batches, bare.batches[:2]
        bare.run()
        bare.batches = batches
    seconds: dict[str, list[float]] = {"extract": [], "neck": []}
    paired: list[float] = []
    for rep in range(reps):  # ABBA order: a linear drift in load cancels
        for path in (("extract", "neck") if rep % 2 == 0 else ("neck", "extract")):
            if path == "extract":
                with CoreTimer() as core:
                    seconds[path].append(float(extract_store(data, ckpt, work / "bench.zarr", args.batch)["seconds"]))
                paired.append(seconds[path][-1] / core.seconds)
            else:
                seconds[path].append(bare.run())
            print(f"[bench] rep {rep + 1}/{reps} {path:<8}: {seconds[path][-1] / n:.3f} s/sample", flush=True)
    per_sample = {p: stats([s / n for s in v]) for p, v in seconds.items()}
    per_rep = [e / b for e, b in zip(seconds["extract"], seconds["neck"], strict=True)]
    return {"seconds_per_sample": per_sample, "samples": n, "batch_size": args.batch,
            "ratio_extract_over_bare_neck_time": {"of_medians": per_sample["extract"]["median"] / per_sample["neck"]["median"],
                                                  "per_rep": per_rep},
            "paired_extract_loop_over_its_loader_and_forward": {"per_rep": paired, "median": statistics.median(paired)},
            "peak_rss_mib": peak_rss_mib()}


# ---------------------------------------------------------------------------------------------
# Parent


def part_stats(runs: list[dict], name: str) -> dict:
    return stats([it.get(name, 0.0) for r in runs for it in r["parts"]])


def summarise(runs: dict[str, list[dict]]) -> dict:
    out: dict = {}
    for v, rs in runs.items():
        names = sorted({k for r in rs for it in r["parts"] for k in it})
        parts = {k: part_stats(rs, k) for k in names}
        # The student's own step: the train step without the teacher's features (online: its forward;
        # cached: the table lookup). Per iteration, so the medians are of matched pairs.
        own = [s - it.get("teacher.features", 0.0) for r in rs for s, it in zip(r["step_seconds"], r["parts"], strict=True)]
        parts["student.own_step"] = stats(own)
        # Within each online iteration, the iteration without the teacher's forward and the image loading:
        # a paired estimate of online / cached that load drift between the two processes cannot skew.
        paired = [t / (t - it.get("teacher.features", 0.0) - sum(it.get(f"loader.{s}", 0.0) for s in IMAGE_STEPS))
                  for r in rs for t, it in zip(r["iteration_seconds"], r["parts"], strict=True)]
        out[v] = {"iteration": stats([t for r in rs for t in r["iteration_seconds"]]),
                  "step": stats([t for r in rs for t in r["step_seconds"]]),
                  "per_rep_median_iteration": [statistics.median(r["iteration_seconds"]) for r in rs],
                  "per_rep_median_step": [statistics.median(r["step_seconds"]) for r in rs],
                  "parts": parts,
                  "paired_ratio_without_teacher_and_images": stats(paired) if v == "online" else None,
                  "bytes_per_sample": {k: statistics.fmean(r["bytes_per_sample"].get(k, 0) for r in rs)
                                       for k in sorted({k for r in rs for k in r["bytes_per_sample"]})},
                  "rchar_per_sample_in_loader": statistics.fmean(r["rchar_per_sample_in_loader"] for r in rs),
                  "setup": stats([r["setup_seconds"] for r in rs]),
                  "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                  "teacher_inputs": rs[0]["teacher_inputs"]}
    return out


def breakdown_rows(t: dict) -> list[list[str]]:
    on, ca = t["variants"]["online"], t["variants"].get("cached")
    it_on = on["iteration"]["median"]

    def med(v: dict | None, k: str) -> float | None:
        return v["parts"][k]["median"] if v and k in v["parts"] else None

    def row(label: str, k: str | None = None, *, value: float | None = None, cached: float | None = None,
            stat: dict | None = None) -> list[str]:
        m = value if k is None else med(on, k)
        s = fmt_stat(on["parts"][k]) if k is not None and k in on["parts"] else (fmt_stat(stat) if stat else fmt_time(m))
        c = cached if k is None else med(ca, k)
        share = f"{100 * m / it_on:.0f}%" if m is not None else "-"
        return [label, s, share, fmt_time(c)]

    img = sum(med(on, f"loader.{s}") or 0.0 for s in IMAGE_STEPS)
    pts = sum(m for k in on["parts"] if k.startswith("loader.") and k not in ("loader.fetch", "loader.Pack3DDetInputs")
              and k.split(".", 1)[1] not in IMAGE_STEPS and (m := med(on, k)) is not None)
    pts_c = sum(m for k in (ca or {"parts": {}})["parts"] if k.startswith("loader.") and k not in ("loader.fetch", "loader.Pack3DDetInputs")
                and (m := med(ca, k)) is not None) if ca else None
    camera = (med(on, "teacher.camera") or 0.0) + (med(on, "teacher.preprocess") or 0.0) - (med(on, "teacher.voxelize") or 0.0)
    lidar = (med(on, "teacher.lidar") or 0.0) + (med(on, "teacher.voxelize") or 0.0)
    rest = sum(med(on, f"teacher.{k}") or 0.0 for k in ("fusion_layer", "pts_backbone", "pts_neck"))
    return [
        ["whole iteration", fmt_stat(on["iteration"]), "100%", fmt_time(ca["iteration"]["median"] if ca else None)],
        row("loader fetch (batch: pipeline + collate)", "loader.fetch"),
        row(f"  image steps ({', '.join(IMAGE_STEPS)}: read + decode 6 JPEGs)", value=img, cached=0.0 if ca else None),
        row("  point steps (LoadPointsFromFile, annotations, filters)", value=pts, cached=pts_c),
        row("  Pack3DDetInputs (online: + image stacking)", "loader.Pack3DDetInputs"),
        row("train step", stat=on["step"], value=on["step"]["median"], cached=ca["step"]["median"] if ca else None),
        row("  teacher features (online: its forward to pts_neck + pooling; cached: table lookup)", "teacher.features"),
        row("    camera branch (image normalisation + extract_img_bev)", value=camera),
        row("      img_backbone", "teacher.img_backbone"),
        row("      img_neck", "teacher.img_neck"),
        row("      view_transform", "teacher.view_transform"),
        row("    LiDAR branch (voxelisation + extract_lidar_bev)", value=lidar),
        row("      voxelisation (teacher's data preprocessor)", "teacher.voxelize"),
        row("      pts_voxel_encoder", "teacher.pts_voxel_encoder"),
        row("      pts_middle_encoder", "teacher.pts_middle_encoder"),
        row("    rest: fusion_layer + pts_backbone + pts_neck", value=rest),
        row("  student's own step (step - teacher features)", "student.own_step"),
    ]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--train-samples", type=int, default=24, help="Synthetic training samples (= CRD n_data).")
    p.add_argument("--batch", type=int, default=2, help="Batch size (training and extraction).")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (OMP_NUM_THREADS in the children).")
    p.add_argument("--warmup", type=int, default=5, help="Iterations dropped at the start of each training run.")
    p.add_argument("--iters", type=int, default=10, help="Timed iterations per training run.")
    p.add_argument("--reps", type=int, default=1, help="Training runs per variant (interleaved, alternating order).")
    p.add_argument("--extract-reps", type=int, default=2, help="Extraction / bare pass pairs (interleaved).")
    p.add_argument("--parts", default="train,extract", help="train, extract or both.")
    p.add_argument("--seed", type=int, default=7)
    # child-only arguments
    p.add_argument("--child", choices=VARIANTS, help="(internal) run one variant and write --child-out")
    p.add_argument("--child-out")
    p.add_argument("--data-root")
    p.add_argument("--store")
    p.add_argument("--checkpoint")
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the children's OpenMP pools
    if args.child:
        return child(args)
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.train_samples, args.warmup, args.iters, args.reps, args.extract_reps = 4, 1, 2, 1, 1
    args.warmup = max(args.warmup, 1)  # the first iteration has no previous end to be timed from
    parts = [x for x in args.parts.split(",") if x]
    if set(parts) - {"train", "extract"}:
        p.error("--parts from ['train', 'extract']")
    warn_if_busy()
    mach = machine()
    work = Path(args.work) / ("quick" if args.quick else "") / "fused"
    work.mkdir(parents=True, exist_ok=True)
    data = camera_data(work.parent, args.train_samples, 2)
    ckpt = random_teacher_checkpoint(work, config=TEACHER_CFG, name="fused-teacher")  # timings: any weights
    import bevcache

    print(f"[bench] bevcache from {Path(bevcache.__file__).parent}", flush=True)
    result: dict = {"bevcache": os.path.relpath(Path(bevcache.__file__).parent, REPO),  # '.../bevcache' = this checkout
                    "train_samples": args.train_samples, "batch_size": args.batch, "threads": args.threads,
                    "loader_workers": 0, "images": "6 x 384x216 JPEG"}

    if "train" in parts:
        store = work / f"store-{data.name}.zarr"
        t0 = time.perf_counter()
        info = extract_store(data, ckpt, store, args.batch)
        print(f"[bench] store {store.name}: {time.perf_counter() - t0:.0f} s", flush=True)
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        common_args = ["--work", str(work), "--data-root", str(data), "--store", str(store), "--checkpoint", str(ckpt),
                       "--batch", str(args.batch), "--threads", str(args.threads), "--warmup", str(args.warmup),
                       "--iters", str(args.iters), "--seed", str(args.seed)]
        for rep in range(args.reps):
            order = list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                out = work / "runs" / f"{variant}-rep{rep}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                run_child([__file__, "--child", variant, "--child-out", str(out), *common_args])
                runs[variant].append(json.loads(out.read_text()))
                print(f"[bench] rep {rep + 1}/{args.reps} {variant:<6}: median iteration "
                      f"{statistics.median(runs[variant][-1]['iteration_seconds']):.3f} s "
                      f"({time.perf_counter() - t0:.0f} s run)", flush=True)
        summary = summarise(runs)
        n = int(info.get("num_samples") or args.train_samples)
        summary["cached"]["store_table_bytes_per_sample"] = table_bytes(store) / n  # read once at build
        summary["cached"]["store_bytes_on_disk"] = dir_bytes(store)

        def ratio(key: str) -> dict:
            per = [a / b for a, b in zip(summary["online"][f"per_rep_median_{key}"],
                                         summary["cached"][f"per_rep_median_{key}"], strict=True)]
            return {"of_medians": summary["online"][key]["median"] / summary["cached"][key]["median"], "per_rep": per}

        result["training"] = {"variants": summary, "runs": runs,
                              "ratios": {"online/cached iteration": ratio("iteration"), "online/cached step": ratio("step")}}

    if "extract" in parts:
        result["extraction"] = extraction(args, work, data, ckpt, args.train_samples)

    dev = mach["cuda"]["device"] if mach["cuda"] else f"CPU {mach['cpu_model']} ({args.threads} threads)"
    if "training" in result:
        t = result["training"]
        print(f"\n### Fused teacher -> LiDAR student, training iteration, batch {args.batch}, n_data {args.train_samples}, "
              f"{args.reps} x {args.iters} timed iterations after {args.warmup} warm-up, loader in-process, on {dev}\n")
        print(table(["part (forward/method/transform timed in the runs)", "online median (IQR)", "of online iteration",
                     "cached median"], breakdown_rows(t)))
        for key, r in t["ratios"].items():
            print(f"- {key}: {r['of_medians']:.2f}x (per repetition " + ", ".join(f"{x:.2f}" for x in r["per_rep"]) + ")")
        pr = t["variants"]["online"]["paired_ratio_without_teacher_and_images"]
        print(f"- online iteration / (same iteration - teacher features - image loading), paired within the online run: "
              f"{pr['median']:.2f}x (IQR {pr['q1']:.2f}-{pr['q3']:.2f})")
        rows = []
        for v in VARIANTS:
            s = t["variants"][v]
            b = s["bytes_per_sample"]
            table_b = s.get("store_table_bytes_per_sample", 0.0)
            rows.append([v, fmt_bytes(b.get("points", 0)), fmt_bytes(b.get("sweeps", 0)), fmt_bytes(b.get("images", 0)),
                         fmt_bytes(b.get("other", 0)), fmt_bytes(table_b) if v == "cached" else "-",
                         fmt_bytes(sum(b.values()) + table_b), fmt_bytes(s["rchar_per_sample_in_loader"]),
                         f"{s['peak_rss_mib']:.0f}"])
        print("\n### Bytes read per sample by the student's loader (timed iterations)\n")
        print(table(["variant", "points", "sweeps", "JPEGs", "other", "store table (once / N)", "total",
                     "read(2) bytes in fetch", "peak RSS MiB"], rows))
    if "extraction" in result:
        e = result["extraction"]
        print(f"\n### Fused teacher extraction, {e['samples']} samples, batch {args.batch}, on {dev}\n")
        print(table(["path", "s/sample median (IQR)"],
                    [["bevcache extract (loop)", fmt_stat(e["seconds_per_sample"]["extract"])],
                     ["bare forward to pts_neck + pool", fmt_stat(e["seconds_per_sample"]["neck"])]]))
        r = e["ratio_extract_over_bare_neck_time"]
        print(f"- extract / bare time: {r['of_medians']:.3f} (per repetition " + ", ".join(f"{x:.3f}" for x in r["per_rep"])
              + "); throughput ratio " + f"{1 / r['of_medians']:.3f}")
        pe = e["paired_extract_loop_over_its_loader_and_forward"]
        print(f"- extract loop / its own loader + forward + pooling (the bare loop's work), paired within each pass: "
              f"{pe['median']:.3f} (per pass " + ", ".join(f"{x:.3f}" for x in pe["per_rep"]) + ")")
    write_result(NAME, args, result, mach)


if __name__ == "__main__":
    main()
