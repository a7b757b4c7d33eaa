"""`make quality`: does a distilled student beat the plain one, at the plain one's cost? (issue 18)

One synthetic data root with cameras (`bevcache synth --cameras`: bicycle and motorcycle identical
to the LiDAR, different in colour); three teachers trained on it, T1 tiny pillar LiDAR (control),
T2 voxel LiDAR (more capacity and resolution; T3's LiDAR branch), T3 fused camera + LiDAR; one
store per teacher (K augmented views, pooled vector and G x G BEV map). The tiny pillar student,
with the teachers' augmentation, trained to a plateau (`--epochs`, a validation each epoch), 3 seeds:
  plain augmented                               `--plain` (shared by the three teachers)
  per teacher: pooled CRD cached                `--cache <store>`, augmentation='auto' (= replay)
               spatial cached                   tuned spatial settings on pts_neck, no pooled CRD, 'auto'
               online counterpart               the better cached variant with the live teacher ('keep')
and the spatial settings chosen first on a held-out split carved from train (`--piece tune`).
Writes docs/quality/report.md (per teacher: beats plain beyond 2 SE? cached ≈ online? cost per
epoch? and the ablations when nothing wins), results.json, map_over_epochs.png, time_per_epoch.png
and docs/quality/spatial_tuning.md.

Pieces of under two hours each on 2 cores, resumable (a finished run whose settings match is
reused; an interrupted one restarts from scratch); every run records its commit and whether the
tree was clean, and a dirty tree is refused (`--allow-dirty` to override):

    .venv/bin/python pipelines/quality/run.py --plan              # every run, its cost, what is done
    .venv/bin/python pipelines/quality/run.py                     # the next unfinished piece, then the report
    .venv/bin/python pipelines/quality/run.py --piece T3-online --only seed=0
    .venv/bin/python pipelines/quality/run.py --piece report      # the report from finished runs
    .venv/bin/python pipelines/quality/run.py --quick --piece all # smoke test -> work_dirs/quality-quick/
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # pipelines/common.py

from costs import next_piece, print_plan, rows  # noqa: E402
from matrix import PIECES, TEACHERS, piece_runs, selected  # noqa: E402
from options import parse_args  # noqa: E402
from reference import run_reference  # noqa: E402
from report import write_report  # noqa: E402
from runs import record, run_dir, run_student  # noqa: E402
from steps import (  # noqa: E402
    ensure_data,
    extract,
    finished_run,
    load_marker,
    record_path,
    store_path,
    store_sig,
    teacher,
    teacher_checkpoint,
    teacher_dir,
    teacher_sig,
    weights_signature,
)
from tuning import finished as tune_finished  # noqa: E402
from tuning import run_tune, selection  # noqa: E402


def trained(args: argparse.Namespace, key: str) -> bool:
    """Teacher `key` has a record and the weights trained under it (both committed under --records)."""
    sig = teacher_sig(args, key)
    return bool(finished_run(args, teacher_dir(args, key), sig)) and weights_signature(Path(teacher_checkpoint(args, key))) == sig


def require_teacher(args: argparse.Namespace, key: str, piece: str, *, store: bool) -> None:
    """The piece's teacher, and for a cached piece its store (extracted again from the recorded
    weights when this clone does not have it)."""
    if not trained(args, key) or not load_marker(record_path(args, store_path(args, key)), store_sig(args, key)):
        sys.exit(f"[quality] {piece} needs teacher {key} and its store: run `--piece teacher-{key}` first")
    if store:
        extract(args, key)


def run_piece(args: argparse.Namespace, piece: str) -> None:
    print(f"[quality] piece {piece}", flush=True)
    if piece.startswith("teacher-"):  # `--only step=train|extract` splits it (T3's two halves are ~1 h each)
        key, step = piece.split("-", 1)[1], args.only.get("step")
        if step in (None, "train"):
            teacher(args, key)
        if step in (None, "extract"):
            if not trained(args, key):
                sys.exit(f"[quality] extracting {key}'s store needs the trained teacher: run "
                         f"`--piece {piece} --only step=train` first")
            extract(args, key)
        return
    if piece == "reference":
        run_reference(args)
        return
    if piece == "tune":
        if not trained(args, args.tune_teacher):
            sys.exit(f"[quality] tune needs teacher {args.tune_teacher}: run `--piece teacher-{args.tune_teacher}` first")
        run_tune(args)
        return
    todo = [run for run in piece_runs(piece, args.seeds)
            if selected(run, args.only) and record(args, run)[1] != "done"]
    if not todo:
        print(f"[quality] {piece}: every selected run is done", flush=True)
        return
    if piece != "plain":
        require_teacher(args, piece.split("-")[0], piece, store=piece.endswith("-cached"))
    for run in todo:
        run_student(args, run)


def collect(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """Every finished teacher, store, student run and tuning point, for the report."""
    teachers = {}
    for key in TEACHERS:
        trec = finished_run(args, teacher_dir(args, key), teacher_sig(args, key))
        srec = load_marker(record_path(args, store_path(args, key)), store_sig(args, key))
        teachers[key] = {"record": trec and {**trec, "record_id": record_id(args, teacher_dir(args, key))},
                         "store": srec and {**srec, "record_id": record_id(args, store_path(args, key))}}
    runs: dict[str, list[dict]] = {}
    for piece in PIECES:
        for run in piece_runs(piece, args.seeds):
            rec, _ = record(args, run)
            if rec:
                runs.setdefault(run.variant, []).append({**rec, "seed": run.seed, "record_id": record_id(args, run_dir(args, run)),
                                                         "mirror": rec.get("mirror") or _mirror(rec)})
    tuning = {"chosen": selection(args), "points": tune_finished(args)}
    return teachers, runs, tuning


def record_id(args: argparse.Namespace, step_dir: Path) -> str:
    """The name the machine ledger knows a step's record by: its path under --records, no suffix."""
    return record_path(args, step_dir).relative_to(args.records).as_posix().removesuffix(".json")


def _mirror(rec: dict) -> str | None:
    what = rec.get("what", "")
    return next((k for k in ("pooled", "spatial") if f"mirrors {k}" in what), None)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv, __doc__)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plan:
        print_plan(args)
        return
    piece = args.piece or "next"
    if piece == "all":
        pieces = list(PIECES)
    elif piece == "next":
        nxt = next_piece(args)
        pieces = [nxt] if nxt else []
        print(f"[quality] next piece: {nxt or 'none: every run is finished'}", flush=True)
    elif piece == "reference":  # a cost base for this machine: no report (nothing in it changed)
        ensure_data(args)
        run_piece(args, piece)
        return
    else:
        pieces = [] if piece == "report" else [piece]
    if pieces:
        ensure_data(args)
    for p in pieces:
        run_piece(args, p)
    plan = io.StringIO()
    with contextlib.redirect_stdout(plan):
        print_plan(args)
    table = rows(args)
    left = sum(r["status"] != "done" for r in table)
    teachers, runs, tuning = collect(args)
    write_report(args, teachers, runs, tuning, plan.getvalue().splitlines(),
                 partial=f"{left} of {len(table)} steps" if left else None)


if __name__ == "__main__":
    main()
