"""`--piece tune`: the spatial loss settings, chosen on a held-out split carved from train.

Where the loss sits is fixed to where the BEV distillation literature puts it: the BEV feature map
the detection head reads (`pts_neck`), behind a learned 1x1 adapter (required: the student's 256
channels must map onto the teacher's 512, so "no adapter" is not a point).
What it does choose, by coordinate search (each stage starts from the previous stage's winner):
  A  loss weight                    0.3, 1, 3, 10 (foreground 1, background 0.1, cells L2-normalised)
  B  foreground weighting           uniform (background 1), foreground only (background 0)
  C  feature normalisation          off: raw adapted features, channel-mean squared error (FitNets),
                                    at B's weight and at 10x it (raw errors are on the teacher's scale)
(the optional InfoNCE term over foreground cells is left out: not among the settings the
literature places the loss by, and a point costs ~10 min)
plus the plain augmented student on the same split as the reference. A point's score is its mean
held-out mAP over the last three validations (less noisy than the last one alone), averaged over
`--tune-seeds`; the highest wins, a tie goes to the earlier (simpler) point.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import git_state
from heldout import make_heldout_root
from steps import (
    extract,
    finished_run,
    rel,
    schedule_options,
    signature,
    store_sig,
    student_args,
    train_run,
)

DEFAULT = {"weight": 1.0, "fg_weight": 1.0, "bg_weight": 0.1, "normalize": True, "contrastive": False}
WEIGHTS = (0.3, 1.0, 3.0, 10.0)
FOREGROUND = {"uniform": {"bg_weight": 1.0}, "fgonly": {"bg_weight": 0.0}}


def tune_dir(args: argparse.Namespace) -> Path:
    return args.out / "tune"


def weights(args: argparse.Namespace) -> tuple[float, ...]:
    return (1.0,) if args.quick else WEIGHTS


def point_name(settings: dict) -> str:
    if settings is None:
        return "plain"
    name = f"w{settings['weight']:g}"
    for tag, change in FOREGROUND.items():
        if settings["bg_weight"] == change["bg_weight"]:
            name += f"-{tag}"
    return name + ("" if settings["normalize"] else "-raw") + ("-nce" if settings["contrastive"] else "")


def heldout(args: argparse.Namespace) -> dict:
    return make_heldout_root(args.data, tune_dir(args) / "data", args.heldout_scenes, seed=args.data_seed)


def heldout_summary(args: argparse.Namespace) -> dict | None:
    f = tune_dir(args) / "data" / "heldout.json"
    return json.loads(f.read_text()) if f.is_file() else None


def point_sig(args: argparse.Namespace, settings: dict | None, seed: int) -> str:
    return signature(step="tune", settings=settings, seed=seed, epochs=args.epochs, batch=args.batch_size,
                     heldout=args.heldout_scenes, upstream=store_sig(args, args.tune_teacher, "heldout"))


def score(record: dict) -> float:
    return statistics.fmean(h["mAP"] for h in record["history"][-3:])


def stages(args: argparse.Namespace, results: dict[str, list[dict]]) -> list[list[dict | None]]:
    """The points of each stage that can be named now (a stage needs its predecessor finished)."""
    a = [None, *[dict(DEFAULT, weight=w) for w in weights(args)]]
    out = [a]
    best_a = best(results, a[1:], args.tune_seeds)
    if best_a is None:
        return out
    b = [dict(best_a, **change) for tag, change in FOREGROUND.items() if not (args.quick and tag == "fgonly")]
    out.append(b)
    best_b = best(results, [best_a, *b], args.tune_seeds)
    if best_b is None:
        return out
    # Raw features are on the teacher's own scale (its pts_neck cells have a channel-mean square of
    # ~0.1 here, against ~2 for the normalised term before training), so raw gets the weight and 10x.
    out.append([dict(best_b, normalize=False), dict(best_b, normalize=False, weight=best_b["weight"] * 10)])
    return out


def best(results: dict[str, list[dict]], points: list[dict], seeds: int) -> dict | None:
    """The highest-scoring point (None until all of them finished their seeds)."""
    if any(len(results.get(point_name(p), [])) < seeds for p in points):
        return None
    return max(points, key=lambda p: (statistics.fmean(score(r) for r in results[point_name(p)]),
                                      -points.index(p)))


def finished(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Finished tuning runs by point name (only those whose settings match this recipe's)."""
    results: dict[str, list[dict]] = {}
    for _ in range(3):  # stages unlock one another
        for stage in stages(args, results):
            for settings in stage:
                name = point_name(settings)
                results[name] = [{**r, "seed": s} for s in range(args.tune_seeds)
                                 if (r := finished_run(args, tune_dir(args) / "runs" / f"{name}-seed{s}",
                                                       point_sig(args, settings, s)))]
    return results


def selection(args: argparse.Namespace) -> dict | None:
    """The chosen spatial settings once every stage finished; None before."""
    results = finished(args)
    all_stages = stages(args, results)
    if len(all_stages) < 3:
        return None
    candidates = [p for stage in all_stages for p in stage if p is not None]
    return best(results, candidates, args.tune_seeds)


def run_tune(args: argparse.Namespace) -> dict:
    """Run every tuning point (stage by stage), then write spatial_tuning.md; returns the winner."""
    summary = heldout(args)
    data = tune_dir(args) / "data"
    _, store = extract(args, args.tune_teacher, data=data, where=tune_dir(args), data_tag="heldout")
    results: dict[str, list[dict]] = {}
    done_stages = 0
    while True:
        all_stages = stages(args, results)
        for stage in all_stages[done_stages:]:
            for settings in stage:
                name = point_name(settings)
                kind = "plain" if settings is None else "spatial"
                for seed in range(args.tune_seeds):
                    run_name = f"{name}-seed{seed}"
                    extra = student_args(args, f"tune-{name}", kind, args.tune_teacher, store, settings)
                    record = train_run(args, tune_dir(args) / "runs" / run_name, point_sig(args, settings, seed),
                                       [*extra, *schedule_options(args, args.epochs, 1, seed, extra[1],
                                                                  summary["fit_samples"])],
                                       f"tune {name}, seed {seed}", data=data, samples=summary["fit_samples"])
                    results.setdefault(name, []).append({**record, "seed": seed})
        done_stages = len(all_stages)
        if len(stages(args, results)) == done_stages:
            break
    chosen = selection(args)
    write_doc(args, summary, finished(args), chosen)
    return chosen


def write_doc(args: argparse.Namespace, summary: dict, results: dict[str, list[dict]], chosen: dict | None) -> None:
    """docs/quality/spatial_tuning.md (with --quick: <out>/report/): what was tried, what won."""
    state = git_state(own_outputs=args.report_dir)
    plain = results.get("plain") or []
    ref = statistics.fmean(score(r) for r in plain) if plain else float("nan")
    commits = sorted({r["git"].get("code_short", r["git"]["short"]) + ("" if r["git"]["clean"] else " (dirty)")
                      for rs in results.values() for r in rs})
    md = ["# Spatial distillation settings, chosen on a held-out split" + (" (QUICK SMOKE RUN)" if args.quick else ""),
          "", "Written by `pipelines/quality/run.py --piece tune` (`pipelines/quality/tuning.py`). "
          f"Runs at commit(s) {', '.join(commits) or '-'}; written at {state['short']}.", "",
          f"Held-out split: {summary['heldout_scenes']} of {summary['heldout_scenes'] + summary['fit_scenes']} train "
          f"scenes ({summary['heldout_samples']} samples, fixed seed {summary['seed']}) held out whole; the student "
          f"trains on the other {summary['fit_samples']}. The val split is never read. Teacher "
          f"{args.tune_teacher}'s store over the fit samples (K={args.views} views, {args.spatial_grid}x"
          f"{args.spatial_grid} maps, augmentation 'auto' = replay); {args.epochs} epochs, "
          f"{args.tune_seeds} seed(s) per point.", "",
          "Fixed, not searched: the loss sits on `pts_neck` (the BEV map the head reads) after a learned 1x1 "
          "adapter, which the widths require (student 256 -> teacher 512 channels). `loss='cosine'` is not a "
          "separate point: on normalised cells the MSE is 2 x (1 - cos), i.e. the same loss at twice the weight.", "",
          "Score = mean held-out mAP over the last 3 validations. Stages: A loss weight (cells L2-normalised), "
          "B foreground weighting at A's winner, C feature normalisation off (`spatial.normalize=False`: raw "
          "adapted features, channel-mean squared error) at B's winner, at its weight and at 10x it (the raw "
          "term starts ~16x smaller than the normalised one on T1's maps).", "",
          "| point | weight | fg / bg weight | normalised | seeds | held-out mAP (last 3, mean) | final mAP | vs plain |",
          "|---|---|---|---|---|---|---|---|"]
    for name, rs in results.items():
        if not rs:
            continue
        s = statistics.fmean(score(r) for r in rs)
        final = statistics.fmean(r["final"]["mAP"] for r in rs)
        if name == "plain":
            md.append(f"| plain augmented (reference) | - | - | - | {len(rs)} | {s:.4f} | {final:.4f} | - |")
            continue
        p = next(p for stage in stages(args, results) for p in stage if p is not None and point_name(p) == name)
        mark = " **(chosen)**" if chosen is not None and point_name(chosen) == name else ""
        md.append(f"| {name}{mark} | {p['weight']:g} | {p['fg_weight']:g} / {p['bg_weight']:g} | "
                  f"{'yes' if p['normalize'] else 'no'} | {len(rs)} | {s:.4f} | {final:.4f} | {s - ref:+.4f} |")
    md += ["", ("Chosen: `spatial=" + json.dumps(chosen) + "`; the matrix's spatial variants use it."
                if chosen else "**Not finished**: the matrix's spatial runs wait for it."), "",
           f"With one seed per point the differences between points are as noisy as one run (seed std of a "
           f"student's final mAP was 0.02-0.06 in docs/quality/report.md at 240 samples): read a small lead "
           f"as a tie. Data: `{rel(tune_dir(args) / 'data')}`."]
    args.report_dir.mkdir(parents=True, exist_ok=True)
    (args.report_dir / "spatial_tuning.md").write_text("\n".join(md) + "\n")
    (args.report_dir / "spatial_tuning.json").write_text(json.dumps(
        {"heldout": {**summary, "data": rel(summary["data"])}, "chosen": chosen,  # committed: no absolute path
         "points": {n: [{k: r[k] for k in ("seed", "final", "history", "git", "seconds")} for r in rs]
                    for n, rs in results.items()}}, indent=2, default=str) + "\n")
    print(f"[quality] spatial tuning: {args.report_dir / 'spatial_tuning.md'}", flush=True)
