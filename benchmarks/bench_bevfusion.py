"""The real BEVFusion-L teacher on CPU: online / cached CRD step time, and extraction vs a bare forward.

mmdetection3d's projects/BEVFusion LiDAR-only model (from a checkout: MMDET3D_ROOT) on the reduced
grid of configs/bevfusion/*_small.py (`--voxels` per side: 384 = +-14.4 m, a 48 x 48 BEV map; 720
= +-27 m, 90 x 90; multiples of 16), random weights (BN statistics perturbed), synthetic data
with one sweep per sample, batch 1.

1. Training step, each variant in its own process (peak RSS is its own), interleaved and rotated
   over repetitions: (b) the half-width BEVFusion student + cached CRD against the teacher's
   pooled pts_neck store, (c) the same with the teacher run every step (`--teacher-online`), and
   optionally (a) the plain student. Timed from `before_train_iter` (last hook) to
   `after_train_iter` (first hook): preprocessing (voxelisation), forward(s), CRD, backward, step.
2. Extraction, in one process, interleaved: `bevcache.extract.extract` (its own loop time:
   loader + teacher + pooling + writes) vs a bare loop over the same loader and teacher,
   `model.extract_feat` (voxelisation -> pts_neck), average-pooled to host memory. Seconds/sample.

    MMDET3D_ROOT=/path/to/mmdetection3d .venv/bin/python benchmarks/bench_bevfusion.py   # alone on the machine
    ... bench_bevfusion.py --quick                                                      # smoke test
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import (
    CONFIGS,
    REPO,
    cuda_peak_mib,
    fmt_stat,
    fmt_time,
    machine,
    parser,
    peak_rss_mib,
    run_child,
    stats,
    sync,
    table,
    warn_if_busy,
    write_result,
)

NAME = "bevfusion"
TEACHER_CFG = CONFIGS / "bevfusion" / "teacher_lidar_small.py"
STUDENT_CFG = CONFIGS / "bevfusion" / "student_lidar_small.py"
VARIANTS = ("plain", "cached", "online")
LABELS = {"plain": "(a) plain student", "cached": "(b) student + cached CRD",
          "online": "(c) online CRD (BEVFusion-L each step)"}


def checkout() -> Path:
    root = Path(os.environ.get("MMDET3D_ROOT") or Path(__file__).resolve().parents[2] / "mmdetection3d")
    if not (root / "projects" / "BEVFusion" / "bevfusion").is_dir():
        sys.exit(f"no mmdetection3d checkout at {root}: export MMDET3D_ROOT=/path/to/mmdetection3d")
    return root.resolve()


# ---------------------------------------------------------------------------------------------
# Fixtures


def bev_data(work: Path, n_train: int, n_val: int) -> Path:
    root = work / f"data-{n_train}-{n_val}-sweeps1"
    if (root / "nuscenes_infos_val.pkl").is_file():
        return root
    from bevcache.synth import generate

    if root.exists():
        import shutil

        shutil.rmtree(root)
    print(f"[bench] synthetic data: {n_train} train / {n_val} val, 1 sweep -> {root}", flush=True)
    generate(root, num_train=n_train, num_val=n_val, seed=0, sweeps=1)
    return root


def teacher_checkpoint(work: Path, voxels: int) -> Path:
    """A seeded random BEVFusion-L; its state dict keeps _metadata (spconv's weight layout)."""
    path = work / "bevfusion-teacher-random.pth"
    if path.is_file():
        return path
    import copy

    import torch
    from mmdet3d.registry import MODELS

    from bevcache.runtime import load_config, setup_runtime

    setup_runtime()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        model = MODELS.build(copy.deepcopy(load_config(TEACHER_CFG).model))
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "meta": {"bench": "random init", "seed": 123}}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return path


def extract_store(data: Path, ckpt: Path, out: Path, *, workers: int = 0) -> dict:
    from bevcache.extract import ExtractOptions, extract

    info = extract(ExtractOptions(config=str(TEACHER_CFG), checkpoint=str(ckpt), out=str(out), data_root=str(data),
                                  batch_size=1, num_workers=workers, dtype="float16", overwrite=True, progress=False))
    if not info["complete"]:
        raise RuntimeError(f"extract left {out} incomplete")
    return info


# ---------------------------------------------------------------------------------------------
# Child: one training variant, one Runner


def child(args) -> None:
    t_start = time.perf_counter()
    import torch
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    from bevcache.train import TrainOptions, build_train_config
    from tests.conftest import iteration_run  # the suite's short-run helper

    class StepStart(Hook):
        t = first = None

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            sync()
            self.t = time.perf_counter()
            self.first = self.first or self.t

    class StepEnd(Hook):
        def __init__(self, start: StepStart):
            self.start, self.times = start, []

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            sync()
            self.times.append(time.perf_counter() - self.start.t)

    opts = TrainOptions(student=str(STUDENT_CFG), data_root=args.data_root, plain=args.child == "plain",
                        cache=args.store if args.child == "cached" else None,
                        teacher_online=str(TEACHER_CFG) if args.child == "online" else None,
                        teacher_checkpoint=args.checkpoint if args.child == "online" else None)
    cfg = build_train_config(opts)
    cfg = iteration_run(cfg, work_dir=Path(args.work) / "runs" / args.child, iters=args.warmup + args.iters,
                        batch_size=1, workers=args.workers, seed=args.seed)
    runner = Runner.from_cfg(cfg)
    start = StepStart()
    end = StepEnd(start)
    runner.register_hook(start, priority="LOWEST")
    runner.register_hook(end, priority="HIGHEST")
    runner.train()
    result = {
        "variant": args.child,
        "step_seconds": end.times[args.warmup:],
        "warmup_seconds": end.times[:args.warmup],
        "setup_seconds": (start.first or time.perf_counter()) - t_start,
        "peak_rss_mib": peak_rss_mib(),
        "cuda_peak_mib": cuda_peak_mib(),
        "trainable_params": sum(p.numel() for p in runner.model.parameters() if p.requires_grad),
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.child_out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Extraction vs a bare forward to pts_neck


class Bare:
    """The teacher, its dataset and index batches of one, built once; a loop without bevcache's extras."""

    def __init__(self, data_root: Path, checkpoint: Path, workers: int):
        from bevcache.data import build_base_dataset, set_data_root, test_pipeline
        from bevcache.extract import build_teacher
        from bevcache.runtime import load_config, resolve_device, setup_runtime

        setup_runtime()
        cfg = load_config(TEACHER_CFG)
        set_data_root(cfg, str(data_root))
        self.model = build_teacher(cfg, str(checkpoint), resolve_device(None))
        self.dataset = build_base_dataset(cfg, "train", pipeline=test_pipeline(cfg))
        self.batches = [[i] for i in range(len(self.dataset))]
        self.workers = workers

    def run(self) -> float:
        import torch

        from bevcache.extract import teacher_batches
        from bevcache.features import pool_output

        sync()
        t0 = time.perf_counter()
        for _, data in teacher_batches(self.model, self.dataset, self.batches, self.workers):
            with torch.inference_mode():
                metas = [s.metainfo for s in data["data_samples"]]
                neck = self.model.extract_feat(data["inputs"], metas)  # BEVFusion: the pts_neck output
                pool_output(neck, "avg", len(metas)).float().cpu().numpy()
        sync()
        return time.perf_counter() - t0


def extraction(args, work: Path, data: Path, warm: Path, ckpt: Path, n: int) -> dict:
    import logging

    logging.getLogger("bevcache").setLevel(logging.WARNING)
    Bare(warm, ckpt, args.workers).run()  # first-call costs (thread pools, allocator) paid untimed
    extract_store(warm, ckpt, work / "warmup.zarr", workers=args.workers)
    bare = Bare(data, ckpt, args.workers)
    seconds: dict[str, list[float]] = {"extract": [], "neck": []}
    for rep in range(args.reps):
        for path in (("extract", "neck") if rep % 2 == 0 else ("neck", "extract")):
            if path == "extract":
                seconds[path].append(float(extract_store(data, ckpt, work / "bench.zarr", workers=args.workers)["seconds"]))
            else:
                seconds[path].append(bare.run())
            print(f"[bench] rep {rep + 1}/{args.reps} {path:<8}: {seconds[path][-1] / n:.2f} s/sample", flush=True)
    per_sample = {p: stats([s / n for s in v]) for p, v in seconds.items()}
    per_rep = [e / b for e, b in zip(seconds["extract"], seconds["neck"], strict=True)]
    return {"seconds_per_sample": per_sample, "samples": n,
            "ratio_extract_over_bare_neck_time": {"of_medians": per_sample["extract"]["median"] / per_sample["neck"]["median"],
                                                  "per_rep": per_rep},
            "peak_rss_mib": peak_rss_mib()}


# ---------------------------------------------------------------------------------------------
# Parent


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--voxels", type=int, default=384, help="Voxels per grid side (multiple of 16; full model: 1440).")
    p.add_argument("--train-samples", type=int, default=8, help="Synthetic training samples (= CRD n_data).")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers.")
    p.add_argument("--warmup", type=int, default=2, help="Iterations dropped at the start of each training run.")
    p.add_argument("--iters", type=int, default=6, help="Timed iterations per training run.")
    p.add_argument("--reps", type=int, default=2, help="Runs per variant / extraction passes (interleaved).")
    p.add_argument("--variants", default="cached,online", help=f"Subset of {','.join(VARIANTS)}.")
    p.add_argument("--parts", default="train,extract", help="train, extract or both.")
    p.add_argument("--seed", type=int, default=7)
    # child-only arguments
    p.add_argument("--child", choices=VARIANTS, help="(internal) run one variant and write --child-out")
    p.add_argument("--child-out")
    p.add_argument("--data-root")
    p.add_argument("--store")
    p.add_argument("--checkpoint")
    args = p.parse_args()
    if args.voxels % 16:
        sys.exit(f"--voxels must be a multiple of 16 (sparse encoder 8x, backbone 2x). Got {args.voxels}.")
    os.environ["BEVFUSION_VOXELS"] = str(args.voxels)  # read by the *_small.py configs, here and in children
    os.environ.setdefault("MMDET3D_ROOT", str(checkout()))
    if args.child:
        return child(args)
    if args.quick:
        # 4: fewer synthetic samples can leave a class out of the gt database, which DataBaseSampler refuses
        args.train_samples, args.warmup, args.iters, args.reps = 4, 1, 1, 1
    variants = [v for v in args.variants.split(",") if v]
    parts = [x for x in args.parts.split(",") if x]
    if set(variants) - set(VARIANTS) or set(parts) - {"train", "extract"}:
        sys.exit(f"--variants from {list(VARIANTS)}, --parts from ['train', 'extract']")
    warn_if_busy()
    mach = machine()
    work = Path(args.work) / ("quick" if args.quick else "") / f"bevfusion-{args.voxels}"
    work.mkdir(parents=True, exist_ok=True)
    data = bev_data(work.parent, args.train_samples, 2)
    ckpt = teacher_checkpoint(work, args.voxels)
    result: dict = {"voxels_per_side": args.voxels, "bev": args.voxels // 8,
                    "checkout": os.path.relpath(os.environ["MMDET3D_ROOT"], REPO),  # repo-relative
                    "train_samples": args.train_samples}

    if "extract" in parts:
        warm = bev_data(work.parent, 2, 2)
        result["extraction"] = extraction(args, work, data, warm, ckpt, args.train_samples)
    if "train" in parts:
        store = work / "store.zarr"
        if "cached" in variants:
            extract_store(data, ckpt, store, workers=args.workers)
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        common_args = ["--voxels", str(args.voxels), "--work", str(work), "--data-root", str(data), "--store", str(store),
                       "--checkpoint", str(ckpt), "--workers", str(args.workers), "--warmup", str(args.warmup),
                       "--iters", str(args.iters), "--seed", str(args.seed)]
        for rep in range(args.reps):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            for variant in order:
                out = work / "runs" / f"{variant}-rep{rep}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                run_child([__file__, "--child", variant, "--child-out", str(out), *common_args])
                runs[variant].append(json.loads(out.read_text()))
                print(f"[bench] rep {rep + 1}/{args.reps} {variant:<6}: median step "
                      f"{statistics.median(runs[variant][-1]['step_seconds']):.2f} s ({time.perf_counter() - t0:.0f} s run)",
                      flush=True)
        summary = {v: {"step": stats([t for r in runs[v] for t in r["step_seconds"]]),
                       "per_rep_median": [statistics.median(r["step_seconds"]) for r in runs[v]],
                       "setup": stats([r["setup_seconds"] for r in runs[v]]),
                       "peak_rss_mib": max(r["peak_rss_mib"] for r in runs[v]),
                       "trainable_params": runs[v][0]["trainable_params"]} for v in variants}

        def ratio(a: str, b: str) -> dict | None:
            if a not in summary or b not in summary:
                return None
            per_rep = [x / y for x, y in zip(summary[a]["per_rep_median"], summary[b]["per_rep_median"], strict=True)]
            return {"of_medians": summary[a]["step"]["median"] / summary[b]["step"]["median"], "per_rep": per_rep}

        result["training"] = {"variants": summary, "runs": runs,
                              "ratios": {"online/cached": ratio("online", "cached"), "cached/plain": ratio("cached", "plain")}}

    dev = mach["cuda"]["device"] if mach["cuda"] else f"CPU {mach['cpu_model']} ({mach['torch_threads']} threads)"
    grid = f"{args.voxels} voxels per side, {args.voxels // 8}x{args.voxels // 8} BEV"
    if "training" in result:
        t = result["training"]
        print(f"\n### BEVFusion-L training step ({grid}), batch 1, n_data {args.train_samples}, "
              f"{args.reps} x {args.iters} timed steps after {args.warmup} warm-up, on {dev}\n")
        print(table(["variant", "s/step median (IQR)", "peak RSS MiB", "setup"],
                    [[LABELS[v], fmt_stat(s["step"]), f"{s['peak_rss_mib']:.0f}", fmt_time(s["setup"]["median"])]
                     for v, s in t["variants"].items()]))
        for key, r in t["ratios"].items():
            if r:
                print(f"- {key}: {r['of_medians']:.3f} (per repetition " + ", ".join(f"{x:.3f}" for x in r["per_rep"]) + ")")
    if "extraction" in result:
        e = result["extraction"]
        print(f"\n### BEVFusion-L extraction ({grid}), {e['samples']} samples, batch 1, on {dev}\n")
        print(table(["path", "s/sample median (IQR)"],
                    [["bevcache extract (loop)", fmt_stat(e["seconds_per_sample"]["extract"])],
                     ["bare forward to pts_neck + pool", fmt_stat(e["seconds_per_sample"]["neck"])]]))
        print(f"- extract / bare time: {e['ratio_extract_over_bare_neck_time']['of_medians']:.3f}")
    write_result(NAME, args, result, mach)


if __name__ == "__main__":
    main()
