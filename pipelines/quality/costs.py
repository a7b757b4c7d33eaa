"""`--plan`: every step and run, its estimated cost, which are done, totals per piece.

Estimates are for 2 CPU cores with nothing else running (OMP_NUM_THREADS=2). Where finished runs of
the same class exist (same sizes: their signatures match), their mean wall clock replaces the model.
The model's seconds, and where they were measured:
- pillar student: 0.79 s per iteration at batch 4 (plain, on the recipe's own root, alone, b80a078;
  benchmarks/results/train_step.json has cached CRD 0.931 / plain 0.914 / online T1 1.010 on the
  demo root, so cached ~x1.02 and online T1 ~x1.10 of plain); spatial x1.05 (docs/quality/
  results.json at eafac9a: spatial replay/warp vs plain augmented, 0.95-1.05x);
- T1 teacher training: 1.2 s per iteration at batch 4 (the recipe's teacher-T1 at b80a078, alone);
  its forward 1 / 33.85 samples/s (benchmarks/results/extract.json);
- validation: 0.125 s per sample + 3 s of devkit evaluation (the tuning's plain run at b80a078: 12
  validations of 40 held-out samples took ~8 s each);
- T2 (spconv voxel trunk): measured by the matrix itself on machine 2 (docs/quality/records/
  machines.json) and brought to machine 1's speed by MACHINE_2_OVER_1 (the plain student's seconds
  per epoch there over here: 63.2 / 33.7): training 46.2 s per 160-sample epoch (teachers/T2),
  extraction 525 s for 160 x 21 inputs with maps (stores/T2-views20-spatial32) -> its forward;
- T3 (T2 + the camera branch): the first model's numbers, benchmarks/results/fused.json (load 5.5,
  f363d67, /2.75 for the load), overestimated T2 12.8x (training) and 11.4x (forward), so T3's
  camera branch (forward 1.09 s per 2 samples, x3 for its backward; the fused extraction 2.07 s/
  sample) is taken at those ratios: an assumption until teacher-T3 measures it;
- extraction with maps: x1.64 the pooled one (benchmarks/results/spatial.json), x(1 + K) for K views;
- 20 s start-up per command.
"""

from __future__ import annotations

import argparse
import statistics

from matrix import PIECES, TEACHERS, piece_runs
from steps import (
    finished_run,
    load_marker,
    record_path,
    rel,
    store_path,
    store_sig,
    teacher_dir,
    teacher_sig,
)

LOADED = 2.75
MACHINE_2_OVER_1 = 63.2 / 33.7
STUDENT = 0.79 / 4
SPATIAL_FACTOR = 1.05
_T2_TRAIN = 46.2 / 160 / MACHINE_2_OVER_1
_T2_FORWARD = 525 / (160 * 21) / 1.64 / MACHINE_2_OVER_1  # 1.64 = MAPS_FACTOR
TEACHER_TRAIN = {"T1": 1.2 / 4, "T2": _T2_TRAIN,
                 "T3": _T2_TRAIN + 3 * 1.086 / 2 / LOADED * _T2_TRAIN / (10.92 / 2 / LOADED)}
TEACHER_FORWARD = {"T1": 1 / 33.85, "T2": _T2_FORWARD, "T3": _T2_FORWARD / 0.77}  # T2 = the fused forward's LiDAR 77 %
PREDICT = 0.125
EVAL = 3.0
MAPS_FACTOR = 1.64
STARTUP = 20.0
PIECE_LIMIT = 2 * 3600


def validation(args: argparse.Namespace, samples: int, teacher: str | None = None) -> float:
    per_sample = PREDICT + (TEACHER_FORWARD[teacher] if teacher in ("T2", "T3") else 0.0)
    return samples * per_sample + EVAL


def student_seconds(args: argparse.Namespace, kind: str, teacher: str | None, train: int, val: int) -> float:
    step = STUDENT * (SPATIAL_FACTOR if kind in ("spatial", "online") else 1.0)
    if kind == "online":
        step += TEACHER_FORWARD[teacher]
    return args.epochs * (train * step + validation(args, val)) + STARTUP


def teacher_seconds(args: argparse.Namespace, key: str) -> float:
    epochs = args.teacher_epochs[key]
    n_val = -(-epochs // min(args.teacher_val_every, epochs))
    return epochs * args.train * TEACHER_TRAIN[key] + n_val * validation(args, args.val, key) + STARTUP


def extract_seconds(args: argparse.Namespace, key: str, samples: int) -> float:
    return (1 + args.views) * samples * TEACHER_FORWARD[key] * MAPS_FACTOR + STARTUP


def rows(args: argparse.Namespace) -> list[dict]:
    """One row per step or run: piece, what, status, estimate (s), measured (s or None)."""
    from runs import record
    from tuning import finished as tune_finished
    from tuning import heldout_summary, point_name, point_sig, stages, tune_dir, weights

    out: list[dict] = []
    measured: dict[str, list[float]] = {}
    pending: list[tuple[dict, str]] = []

    def add(piece: str, what: str, status: str, estimate: float, cls: str, seconds: float | None) -> None:
        row = {"piece": piece, "what": what, "status": status, "estimate": estimate, "seconds": seconds}
        if seconds is not None:
            measured.setdefault(cls, []).append(seconds)
        out.append(row)
        pending.append((row, cls))

    held = heldout_summary(args) or {"fit_samples": round(args.train * (1 - args.heldout_scenes)),
                                      "heldout_samples": round(args.train * args.heldout_scenes)}
    for piece in PIECES:
        if piece.startswith("teacher-"):
            key = piece.split("-")[1]
            rec = finished_run(args, teacher_dir(args, key), teacher_sig(args, key))
            add(piece, f"train {TEACHERS[key].label}, {args.teacher_epochs[key]} epochs",
                "done" if rec else "todo", teacher_seconds(args, key), piece, rec and rec["seconds"])
            store = store_path(args, key)
            rec = load_marker(record_path(args, store), store_sig(args, key))
            add(piece, f"extract {key} (K={args.views}, maps {args.spatial_grid}x{args.spatial_grid})",
                "done" if rec else "todo", extract_seconds(args, key, args.train), f"extract-{key}",
                rec and rec["seconds"])
        elif piece == "tune":
            key = args.tune_teacher
            store = store_path(args, key, tune_dir(args))
            rec = load_marker(record_path(args, store), store_sig(args, key, "heldout"))
            add(piece, f"extract {key} over the fit split", "done" if rec else "todo",
                extract_seconds(args, key, held["fit_samples"]), "extract-tune", rec and rec["seconds"])
            results = tune_finished(args)
            named = stages(args, results)
            n_points = sum(len(s) for s in named)
            for stage in named:
                for settings in stage:
                    for seed in range(args.tune_seeds):
                        name = point_name(settings)
                        rec = finished_run(args, tune_dir(args) / "runs" / f"{name}-seed{seed}",
                                           point_sig(args, settings, seed))
                        add(piece, f"tune {name} seed {seed}", "done" if rec else "todo",
                            student_seconds(args, "plain" if settings is None else "spatial", None,
                                            held["fit_samples"], held["heldout_samples"]),
                            "tune", rec and rec["seconds"])
            total_points = 1 + len(weights(args)) + (3 if args.quick else 4)  # plain, A, B, C
            for i in range(n_points, total_points):
                add(piece, f"tune point {i + 1} (named when its stage starts)", "todo",
                    student_seconds(args, "spatial", None, held["fit_samples"], held["heldout_samples"]),
                    "tune", None)
        else:
            for run in piece_runs(piece, args.seeds):
                rec, status = record(args, run)
                add(piece, run.name, status, student_seconds(args, run.kind, run.teacher, args.train, args.val),
                    run.variant, rec and rec["seconds"])
    for row, cls in pending:  # measured classes replace the model for their unfinished rows
        if row["seconds"] is None and measured.get(cls):
            row["estimate"] = statistics.fmean(measured[cls])
            row["basis"] = "measured"
    return out


def print_plan(args: argparse.Namespace) -> None:
    table = rows(args)
    hours = lambda s: f"{s / 3600:.2f} h"  # noqa: E731
    print(f"Quality matrix plan: {args.train} train / {args.val} val samples (cameras), students {args.epochs} "
          f"epochs x {args.seeds} seeds, teachers {args.teacher_epochs}, K={args.views}, maps "
          f"{args.spatial_grid}x{args.spatial_grid}; out {rel(args.out)}")
    print("Estimates: 2 idle cores; sources in pipelines/quality/costs.py; 'measured' = mean wall clock of "
          "finished runs of the same class.\n")
    print(f"{'piece':<12} {'step / run':<58} {'status':<12} {'estimate':>9} {'recorded':>9}")
    total = left = 0.0
    for piece in PIECES:
        mine = [r for r in table if r["piece"] == piece]
        for r in mine:
            rec = f"{r['seconds'] / 60:.1f} m" if r["seconds"] is not None else "-"
            est = f"{r['estimate'] / 60:.1f} m" + ("*" if r.get("basis") else "")
            print(f"{piece:<12} {r['what'][:58]:<58} {r['status'][:12]:<12} {est:>9} {rec:>9}")
        cost = sum(r["seconds"] if r["seconds"] is not None else r["estimate"] for r in mine)
        todo = sum(r["estimate"] for r in mine if r["seconds"] is None)
        total, left = total + cost, left + todo
        split = "step=train, then step=extract" if piece.startswith("teacher-") else "e.g. seed=0, seed=1, seed=2"
        flag = f"  ** over 2 h: split it with --only ({split})" if todo > PIECE_LIMIT else ""
        print(f"{'':<12} {'= piece ' + piece:<58} {'':<12} {hours(cost):>9} {'left ' + hours(todo):>9}{flag}\n")
    print(f"total {hours(total)}, left {hours(left)}   (* = estimate from measured runs of the same class)")


def next_piece(args: argparse.Namespace) -> str | None:
    """The first piece with a step that is not done."""
    for row in rows(args):
        if row["status"] != "done":
            return row["piece"]
    return None

