"""Command-line settings of the quality recipe (sizes, pieces, places)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from common import REPO
from matrix import PIECES, TEACHERS

# Defaults sized so the whole matrix is about ten hours on 2 CPU cores in pieces of under two
# (pipelines/quality/README.md, `--plan`): 160 train / 40 val samples, students 20 epochs (at 12 the
# plain student's held-out mAP still rose 0.566 -> 0.595 -> 0.620 -> 0.639 over the last epochs).
# T2 and T3 train 40 epochs: at 8, T2 reached 0.550 val mAP, still rising (0.08, 0.32, 0.46, 0.55),
# under the plain student's 0.757, i.e. a teacher that knew less than its student; its steps cost
# ~1.3 s, not the ~8 s the first cost model assumed (records from 466bdb9 pass `--teacher-epochs`).
DEFAULT_TEACHER_EPOCHS = {"T1": 10, "T2": 40, "T3": 40}


def absolute(path: str | Path) -> Path:
    """An absolute, normalised path that keeps symlinks: a data root or store linked in from another checkout
    stays under this repository's paths, so records and reports name it repo-relative."""
    return Path(os.path.abspath(path))


def parse_args(argv: list[str] | None = None, doc: str = "") -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Pieces, in order: " + ", ".join(PIECES))
    p.add_argument("--piece", default=None,
                   help="What to run: a piece name, 'next' (the first unfinished piece), 'all', 'report' "
                        "(train nothing, write the report), or 'reference' (a short plain run: this machine's "
                        "cost base). Without --piece and --plan: 'next'.")
    p.add_argument("--only", default="", help="Within the piece, only the runs matching every key, "
                                              "e.g. 'seed=0' or 'kind=online,seed=2' (keys: teacher, kind, seed); "
                                              "a teacher piece: 'step=train' or 'step=extract'.")
    p.add_argument("--plan", action="store_true", help="Print every step and run, its estimated cost, which are "
                                                       "done, and the totals per piece; run nothing.")
    p.add_argument("--train", type=int, default=160, help="Synthetic training samples (= CRD n_data).")
    p.add_argument("--val", type=int, default=40, help="Synthetic validation samples.")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--cue-lidar-trace", type=float, default=0.0,
                   help="Give the camera cue a weak LiDAR trace (`bevcache synth --cue-lidar-trace`: the cycles' "
                        "return intensity split by T, in [0, 0.5]) [default 0: the cue is camera-only]. T > 0 is "
                        "another experiment: its data, work dir and report (with records) get their own default "
                        "places, so the camera-only matrix's records stay as they are.")
    p.add_argument("--epochs", type=int, default=20, help="Student epochs, a validation after each (the curve).")
    p.add_argument("--teacher-epochs", default=",".join(f"{k}={v}" for k, v in DEFAULT_TEACHER_EPOCHS.items()),
                   help="Epochs per teacher, e.g. T1=10,T2=40,T3=40 (a validation every --teacher-val-every).")
    p.add_argument("--teacher-val-every", type=int, default=2)
    p.add_argument("--seeds", type=int, default=3, help="Seeds per student variant (0..S-1).")
    p.add_argument("--views", type=int, default=None,
                   help="K augmented views per sample in every teacher's store [default: --epochs, so no "
                        "student sees a view twice; pipelines/quality/README.md, 'Views'].")
    p.add_argument("--spatial-grid", type=int, default=32,
                   help="BEV grid G x G of the stored maps (T1's 64x64 map pooled 2x2; T2/T3's are 32x32).")
    p.add_argument("--online-of", choices=("auto", "pooled", "spatial"), default="auto",
                   help="Which cached variant the online runs mirror [auto: the one with the higher mean final mAP].")
    p.add_argument("--tune-teacher", choices=sorted(TEACHERS), default="T1",
                   help="The teacher whose maps the spatial tuning distils (T1: cheapest to extract).")
    p.add_argument("--tune-seeds", type=int, default=1, help="Seeds per tuning point.")
    p.add_argument("--heldout-scenes", type=float, default=0.25,
                   help="Fraction of the train scenes held out for the spatial tuning (never val).")
    p.add_argument("--batch-size", type=int, default=None, help="Override the configs' batch size (4).")
    p.add_argument("--data", default=None, help="Data root [default: data/quality-cam-<train>-<val>-s<seed>].")
    p.add_argument("--out", default=None, help="Work dir [default: work_dirs/quality, or work_dirs/quality-quick].")
    p.add_argument("--report-dir", default=None,
                   help="Report dir [default: docs/quality, or <out>/report with --quick].")
    p.add_argument("--records", default=None,
                   help="Where each finished step's record (and each teacher's weights) goes: the matrix's "
                        "state, committed so a fresh clone resumes [default: <report-dir>/records].")
    p.add_argument("--reference-epochs", type=int, default=3,
                   help="Epochs of `--piece reference` (the plain student, seed 0, no validation).")
    p.add_argument("--allow-dirty", action="store_true",
                   help="Train on a tree with local changes (each run records it; the report flags it).")
    p.add_argument("--quick", action="store_true",
                   help="Smoke test: 16 train / 8 val, 1 epoch, 1 seed, K=1, two tuning points; "
                        "writes under work_dirs/quality-quick/ only.")
    args = p.parse_args(argv)
    try:
        args.teacher_epochs = {**DEFAULT_TEACHER_EPOCHS, **{k: int(v) for k, v in (
            item.split("=") for item in args.teacher_epochs.split(",") if item)}}
        args.only = dict(item.split("=") for item in args.only.split(",") if item)
    except ValueError:
        p.error("--teacher-epochs and --only take key=value items separated by commas")
    if set(args.teacher_epochs) - set(TEACHERS) or set(args.only) - {"teacher", "kind", "seed", "step"}:
        p.error(f"unknown keys in --teacher-epochs ({sorted(TEACHERS)}) or --only (teacher, kind, seed; step for "
                "a teacher piece)")
    if "step" in args.only and (args.only["step"] not in ("train", "extract") or len(args.only) > 1
                                or not str(args.piece).startswith("teacher-")):
        p.error("--only step=train or step=extract, alone, splits a teacher piece (e.g. --piece teacher-T3)")
    if args.piece not in (None, "next", "all", "report", "reference", *PIECES):
        p.error(f"--piece must be next, all, report, reference or one of {', '.join(PIECES)}")
    if args.reference_epochs < 1:
        p.error("--reference-epochs must be >= 1")
    if not 0.0 <= args.cue_lidar_trace <= 0.5:  # bevcache.synth.MAX_CUE_LIDAR_TRACE (not imported: it pulls torch)
        p.error("--cue-lidar-trace must be in [0, 0.5]")
    if args.views is None:
        args.views = args.epochs
    if args.views < 1:
        p.error("--views must be >= 1 (the cached variants replay the store's views)")
    if args.quick:
        args.train, args.val, args.epochs, args.seeds, args.views = 16, 8, 1, 1, 1
        args.teacher_epochs = {k: 1 for k in TEACHERS}
        args.teacher_val_every = 1
    trace = f"-cue-trace-{args.cue_lidar_trace:g}" if args.cue_lidar_trace else ""
    args.out = absolute(args.out or REPO / "work_dirs" / (("quality-quick" if args.quick else "quality") + trace))
    args.report_dir = absolute(args.report_dir or (args.out / "report" if args.quick else REPO / "docs" / f"quality{trace}"))
    args.records = absolute(args.records or args.report_dir / "records")
    tag = "quick-" if args.quick else ""
    args.data = absolute(args.data or REPO / "data" / f"quality-{tag}cam-{args.train}-{args.val}-s{args.data_seed}{trace}")
    return args


def iters_per_epoch(args: argparse.Namespace, samples: int | None = None) -> int:
    batch = args.batch_size or 4
    return -(-(samples or args.train) // batch)
