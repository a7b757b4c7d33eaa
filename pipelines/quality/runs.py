"""Student runs of the matrix: their settings signature, which online variant, running one."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from matrix import CACHED, Run
from steps import (
    data_parts,
    finished_run,
    schedule_options,
    signature,
    store_path,
    store_sig,
    student_args,
    teacher_sig,
    train_run,
)
from tuning import selection


def run_dir(args: argparse.Namespace, run: Run) -> Path:
    return args.out / "runs" / run.name


def online_of(args: argparse.Namespace, teacher: str, spatial: dict | None) -> str | None:
    """The cached kind the teacher's online runs mirror: --online-of, or the one with the higher
    mean final mAP once both finished every seed (None before: the online piece must wait)."""
    if args.online_of != "auto":
        return args.online_of
    means = {}
    for kind in CACHED:
        records = [finished(args, Run(kind, s, teacher), spatial) for s in range(args.seeds)]
        if any(r is None for r in records):
            return None
        means[kind] = statistics.fmean(r["final"]["mAP"] for r in records)
    return max(CACHED, key=lambda k: (means[k], k == "pooled"))  # a tie: the cheaper, pooled


def run_sig(args: argparse.Namespace, run: Run, spatial: dict | None, mirror: str | None = None) -> str | None:
    """The run's settings signature; None while a choice it depends on is still open."""
    uses_spatial = run.kind == "spatial" or (run.kind == "online" and mirror == "spatial")
    if uses_spatial and spatial is None:
        return None
    if run.kind == "online" and mirror is None:
        return None
    upstream = None
    if run.kind in CACHED:
        upstream = store_sig(args, run.teacher)
    elif run.kind == "online":
        upstream = teacher_sig(args, run.teacher)
    return signature(step="student", kind=run.kind, mirror=mirror, seed=run.seed, epochs=args.epochs,
                     batch=args.batch_size, **data_parts(args), upstream=upstream, spatial=spatial if uses_spatial else None,
                     augmentation="keep" if run.kind == "online" else "auto")


def finished(args: argparse.Namespace, run: Run, spatial: dict | None, mirror: str | None = None) -> dict | None:
    sig = run_sig(args, run, spatial, mirror)
    return finished_run(args, run_dir(args, run), sig) if sig else None


def record(args: argparse.Namespace, run: Run) -> tuple[dict | None, str]:
    """(finished record or None, status: done | todo | blocked (why))."""
    spatial = selection(args)
    mirror = online_of(args, run.teacher, spatial) if run.kind == "online" else None
    if run.kind == "online" and mirror is None:
        return None, f"blocked ({run.teacher}-cached unfinished: it picks the online variant)"
    sig = run_sig(args, run, spatial, mirror)
    if sig is None:
        return None, "blocked (tune unfinished: the spatial settings)"
    done = finished_run(args, run_dir(args, run), sig)
    return done, "done" if done else "todo"


def run_student(args: argparse.Namespace, run: Run) -> dict:
    spatial = selection(args)
    mirror = online_of(args, run.teacher, spatial) if run.kind == "online" else None
    sig = run_sig(args, run, spatial, mirror)
    if sig is None:
        raise SystemExit(f"[quality] {run.name}: " + record(args, run)[1] + "; run the earlier piece first")
    kind = f"online-{mirror}" if run.kind == "online" else run.kind
    store = store_path(args, run.teacher) if run.kind in CACHED else None
    extra = student_args(args, run.name, kind, run.teacher, store, spatial)
    what = f"student {run.variant}{f' (mirrors {mirror})' if mirror else ''}, seed {run.seed}"
    rec = train_run(args, run_dir(args, run), sig,
                    [*extra, *schedule_options(args, args.epochs, 1, run.seed, extra[1])], what)
    return {**rec, "mirror": mirror}
