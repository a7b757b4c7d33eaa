"""`make quality`: does cached CRD match online CRD, cost what plain training costs, and help?

synth data -> train the tiny teacher -> `bevcache extract` -> train the tiny student, each for S
seeds with the same schedule and a validation every epoch:
  (a) plain            `bevcache train --plain`
  (b) cached CRD       `bevcache train --cache features.zarr`
  (c) online CRD       `bevcache train --teacher-online configs/tiny_teacher.py --teacher-checkpoint ...`
and the same with the teacher's augmentation (configs/tiny_student_replay.py):
  (a+) plain, augmented                     `--plain`
  (c+) online CRD, augmented                `--teacher-online ... --distill augmentation=keep`
  (d)  cached CRD + augmentation replay     `--cache features-views<K>.zarr` (`bevcache extract --views K`)
  (b+) cached CRD, augmentation kept        `--cache features.zarr --distill augmentation=keep`
and spatial (BEV map) distillation of pts_neck, augmented (`bevcache extract --spatial pts_neck=<grid>`):
  (e)  spatial cached + warp                `--cache features-spatial<G>.zarr`, layers={} (no CRD), augmentation='warp'
  (f)  spatial online                       `--teacher-online ...`, spatial channels/grid, augmentation='keep'
                                            (pooled CRD layer kept with alpha=0: bevcache fails on layers={} online)
  (g)  spatial cached + replay              `--cache features-views<K>-spatial<G>.zarr`, layers={}, augmentation='replay'
  (h)  CRD + spatial cached + warp          `--cache features-spatial<G>.zarr`, pooled CRD + spatial, augmentation='warp'
The spatial variants' `distill` settings are written into a generated student config
(<out>/configs/<variant>.py, `_base_` = configs/tiny_student_replay.py): `--distill key=value`
cannot carry a dict with more than one key (mmengine's DictAction splits it at the commas).
plus optional tuning variants of (b) (`--alpha 0.5,2`, `--nce-k 256,1024`), and the extraction
cost for each K of `--views-cost` (wall clock and store size).
Writes docs/quality/report.md, results.json, map_over_epochs.png, time_per_epoch.png.

Resumable: every finished step leaves a `quality_run.json` (its settings, metrics and wall clock)
in its work dir, and a re-run reuses any step whose settings match; an interrupted step is
started again from scratch (so its wall clock stays a real one).

    .venv/bin/python pipelines/quality/run.py                 # 1200/300 samples, 3 seeds, 8 epochs: ~8 h on 2 cores
    .venv/bin/python pipelines/quality/run.py --quick         # smoke test -> work_dirs/quality-quick/
    .venv/bin/python pipelines/quality/run.py --alpha 0.5,2 --nce-k 256
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # pipelines/common.py

from common import REPO, bevcache, git_state, val_history  # noqa: E402

TEACHER_CFG = "configs/tiny_teacher.py"
STUDENT_CFG = "configs/tiny_student.py"
REPLAY_STUDENT_CFG = "configs/tiny_student_replay.py"  # the teacher's augmented train pipeline
MARKER = "quality_run.json"
LABELS = {"plain": "(a) plain", "cached": "(b) cached CRD", "online": "(c) online CRD",
          "plain-aug": "(a+) plain, augmented", "online-aug": "(c+) online CRD, augmented",
          "cached-replay": "(d) cached CRD + augmentation replay",
          "cached-keep": "(b+) cached CRD, augmented (keep)",
          "spatial-warp": "(e) spatial cached + warp",
          "spatial-online": "(f) spatial online, augmented",
          "spatial-replay": "(g) spatial cached + replay",
          "crd-spatial-warp": "(h) CRD + spatial cached + warp"}
AUGMENTED = ("plain-aug", "online-aug", "cached-replay", "cached-keep", "spatial-warp", "spatial-online",
             "spatial-replay", "crd-spatial-warp")
SPATIAL = ("spatial-warp", "spatial-online", "spatial-replay", "crd-spatial-warp")
# Which store each cached variant trains on: (views, spatial).
STORE_OF = {"cached": (0, False), "cached-keep": (0, False), "cached-replay": ("K", False),
            "spatial-warp": (0, True), "crd-spatial-warp": (0, True), "spatial-replay": ("K", True)}
TEACHER_CHANNELS = 512  # the tiny teacher's pts_neck (needed by online spatial distillation)
TIME_KEYS = ("time", "data_time")


# ---------------------------------------------------------------------------------------------
# Settings


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=1200, help="Synthetic training samples (= CRD n_data).")
    p.add_argument("--val", type=int, default=300, help="Synthetic validation samples.")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--epochs", type=int, default=8, help="Student epochs (validation after every epoch).")
    p.add_argument("--seeds", type=int, default=3, help="Seeds per student variant (0..S-1).")
    p.add_argument("--variants", default=",".join(LABELS), help=f"Subset of {','.join(LABELS)}.")
    p.add_argument("--views", type=int, default=4, help="K augmented views per sample for (d).")
    p.add_argument("--spatial-grid", type=int, default=32,
                   help="BEV grid (G x G cells) the spatial stores keep pts_neck maps at; the map is 64x64.")
    p.add_argument("--previous", default=None,
                   help="results.json of an earlier run: its variants not run now are listed in a separate table.")
    p.add_argument("--views-cost", default="0,2,4,8", help="Measure extraction time and store size for these K.")
    p.add_argument("--alpha", default="", help="Extra cached-CRD variants with these alphas, e.g. 0.5,2.")
    p.add_argument("--nce-k", default="", help="Extra cached-CRD variants with these nce_k, e.g. 256,1024.")
    p.add_argument("--batch-size", type=int, default=None, help="Override the configs' batch size (4).")
    p.add_argument("--data", default=None, help="Data root [default: data/quality-<train>-<val>-s<seed>].")
    p.add_argument("--out", default=None, help="Work dir [default: work_dirs/quality, or work_dirs/quality-quick].")
    p.add_argument("--report-dir", default=None, help="Report dir [default: docs/quality, or <out>/report with --quick].")
    p.add_argument("--report-only", action="store_true",
                   help="Train nothing: report the finished runs (each variant with the seeds it has).")
    p.add_argument("--measured-at", default=None,
                   help="With --report-only: the commit the runs were taken at, if the report is written at another.")
    p.add_argument("--quick", action="store_true", help="24 train / 8 val, 1 epoch, 1 seed: a smoke test "
                                                        "that writes under work_dirs/quality-quick/ only.")
    args = p.parse_args(argv)
    if args.views < 1:
        p.error("--views must be >= 1")
    if args.quick:
        args.train, args.val, args.teacher_epochs, args.epochs, args.seeds = 24, 8, 1, 1, 1
    args.out = Path(args.out or REPO / "work_dirs" / ("quality-quick" if args.quick else "quality")).resolve()
    args.report_dir = Path(args.report_dir or (args.out / "report" if args.quick else REPO / "docs" / "quality")).resolve()
    args.data = Path(args.data or REPO / "data" / f"quality-{args.train}-{args.val}-s{args.data_seed}").resolve()
    return args


def variants(args) -> list[dict]:
    """Every student variant: name, kind, label and the extra `bevcache train` arguments."""
    out = []
    for kind in [v for v in args.variants.split(",") if v]:
        if kind not in LABELS:
            sys.exit(f"unknown variant {kind!r}; known: {list(LABELS)}")
        label = LABELS[kind] + (f" (K={args.views})" if kind in ("cached-replay", "spatial-replay") else "")
        if kind in SPATIAL:
            label += f" ({args.spatial_grid}x{args.spatial_grid})"
        out.append({"name": kind, "kind": kind, "label": label, "distill": {}, "config_distill": config_distill(args, kind)})
    for a in [x for x in args.alpha.split(",") if x]:
        out.append({"name": f"cached-alpha{a}", "kind": "cached", "label": f"(b') cached CRD, alpha={a}",
                    "distill": {"alpha": float(a)}})
    for k in [x for x in args.nce_k.split(",") if x]:
        if int(k) >= args.train:
            sys.exit(f"--nce-k {k} must be below the number of training samples ({args.train}).")
        out.append({"name": f"cached-k{k}", "kind": "cached", "label": f"(b') cached CRD, nce_k={k}",
                    "distill": {"nce_k": int(k)}})
    return out


def config_distill(args, kind: str) -> dict:
    """The `distill` settings a variant writes into its generated config ({}: the config's own)."""
    if kind not in SPATIAL:
        return {}
    spatial = {"layers": {"pts_neck": "pts_neck"}, "weight": 1.0}
    if kind == "spatial-online":
        spatial.update(channels=TEACHER_CHANNELS, grid=(args.spatial_grid, args.spatial_grid))
    policy = {"spatial-warp": "warp", "crd-spatial-warp": "warp", "spatial-online": "keep", "spatial-replay": "replay"}
    out = {"spatial": spatial, "augmentation": policy[kind]}
    if kind == "spatial-online":
        # Spatial only, online: bevcache records the online teacher's `layers` only, so layers={}
        # fails ("layer(s) ['pts_neck'] produced no output in the forward pass"). Keep the pooled
        # CRD layer (the teacher then records pts_neck) with alpha=0: no CRD gradient reaches the student.
        out["alpha"] = 0.0
    elif kind != "crd-spatial-warp":
        out["layers"] = {}  # no pooled CRD: spatial only
    return out


def write_config(args, name: str, base: str, distill: dict) -> Path:
    """A student config = `base` with these `distill` settings (layers={} replaces the base's layers)."""
    path = args.out / "configs" / f"{name}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    items = {k: ({"_delete_": True} if k == "layers" and not v else v) for k, v in distill.items()}
    path.write_text(f"_base_ = [{str(REPO / base)!r}]\ndistill = {items!r}\n")
    return path


def iters_per_epoch(args) -> int:
    return math.ceil(args.train / (args.batch_size or 4))


@functools.cache
def box_cap_items(config: str) -> tuple[str, ...]:
    """Keep CenterPoint's boxes per sample within the nuScenes devkit's 500.

    The devkit asserts `<= 500 boxes per sample`; a CenterHead keeps up to `post_max_size` boxes
    per task, so the tiny configs (6 tasks x 100) can emit 600 for a barely trained model (first
    validations) and crash the evaluation. Lower post_max_size when (and only when) the config
    allows more than 500.
    """
    from mmengine.config import Config

    cfg = Config.fromfile(str(REPO / config), import_custom_modules=False)
    head, test = cfg.model.get("pts_bbox_head") or {}, (cfg.model.get("test_cfg") or {}).get("pts") or {}
    tasks, per_task = len(head.get("tasks", [])), test.get("post_max_size")
    if not tasks or not per_task or tasks * per_task <= 500 or test.get("nms_type") is None:
        return ()
    cap = 500 // tasks
    print(f"[quality] {config}: {tasks} tasks x post_max_size {per_task} > the devkit's 500 boxes per sample: "
          f"evaluating with post_max_size={cap}", flush=True)
    return (f"model.test_cfg.pts.post_max_size={cap}",)


def schedule_options(args, epochs: int, val_interval: int, seed: int, config: str) -> list[str]:
    """`--cfg-options` items (each its own flag) for an `epochs`-long cosine schedule.

    Iteration times are logged (and averaged) every min(10, iterations per epoch) iterations,
    so even a tiny epoch logs its time.
    """
    log_every = min(10, iters_per_epoch(args))
    items = [f"train_cfg.max_epochs={epochs}", f"train_cfg.val_interval={val_interval}",
             f"param_scheduler.1.end={epochs}", f"param_scheduler.1.T_max={epochs}", f"randomness.seed={seed}",
             f"default_hooks.logger.interval={log_every}", f"log_processor.window_size={log_every}",
             *box_cap_items(config)]
    batch_size = args.batch_size
    if batch_size:
        items.append(f"train_dataloader.batch_size={batch_size}")
    return [arg for item in items for arg in ("--cfg-options", item)]


def rel(path) -> str:
    """A path as committed outputs hold it: relative to the repository when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def signature(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Steps (each reused when its marker says it finished with the same settings)


def load_marker(work_dir: Path, sig: str) -> dict | None:
    marker = work_dir / MARKER
    if marker.is_file():
        record = json.loads(marker.read_text())
        if record.get("signature") == sig:
            return record
    return None


def fresh(work_dir: Path) -> None:
    """An unfinished or outdated step starts over in an empty work dir."""
    if work_dir.exists():
        print(f"[quality] {work_dir} is unfinished or outdated: starting it again", flush=True)
        shutil.rmtree(work_dir)


def epoch_times(work_dir: Path, iters_per_epoch: int) -> dict[int, float]:
    """Training seconds per epoch: mean logged iteration time x iterations (validation excluded)."""
    per_epoch: dict[int, list[float]] = {}
    for scalars in sorted(Path(work_dir).glob("*/vis_data/scalars.json")):
        for line in scalars.read_text().splitlines():
            row = json.loads(line)
            if "epoch" in row and "time" in row and "iter" in row:
                per_epoch.setdefault(int(row["epoch"]), []).append(float(row["time"]))
    return {e: statistics.fmean(t) * iters_per_epoch for e, t in sorted(per_epoch.items())}


def train_run(args, work_dir: Path, log: Path, sig: str, train_args: list[str], epochs: int, what: str) -> dict:
    done = load_marker(work_dir, sig)
    if done:
        print(f"[quality] {what}: done before, reused ({work_dir})", flush=True)
        return done
    if getattr(args, "report_only", False):
        print(f"[quality] {what}: not finished, left out (--report-only)", flush=True)
        return None
    fresh(work_dir)
    print(f"[quality] {what} -> {work_dir} (log {log})", flush=True)
    seconds = bevcache("train", *train_args, "--work-dir", str(work_dir), "--data-root", str(args.data), log_file=log)
    history = val_history(work_dir)
    if not history:
        sys.exit(f"{what}: no validation metrics under {work_dir}; see {log}")
    record = {"signature": sig, "what": what, "seconds": seconds, "history": history, "final": history[-1],
              "epochs": epochs, "train_seconds_per_epoch": epoch_times(work_dir, iters_per_epoch(args)),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (work_dir / MARKER).write_text(json.dumps(record, indent=2))
    return record


def teacher(args) -> tuple[dict, str]:
    sig = signature(step="teacher", train=args.train, val=args.val, data_seed=args.data_seed,
                    epochs=args.teacher_epochs, batch=args.batch_size)
    work_dir = args.out / "teacher"
    record = train_run(args, work_dir, args.out / "logs" / "teacher.log", sig,
                       ["--student", TEACHER_CFG, "--plain",
                        *schedule_options(args, args.teacher_epochs, args.teacher_epochs, 0, TEACHER_CFG)],
                       args.teacher_epochs, "teacher")
    ckpt = (work_dir / "last_checkpoint").read_text().strip()
    return record, ckpt


def extract(args, teacher_sig: str, ckpt: str, views: int = 0, where: Path | None = None,
            spatial: int | None = None) -> tuple[dict, Path]:
    """The teacher's pts_neck store (with `views` augmented views per sample when > 0, and its
    BEV maps on a `spatial` x `spatial` grid when given)."""
    from bevcache.store import open_store

    tag = (f"-views{views}" if views or where else "") + (f"-spatial{spatial}" if spatial else "")
    where = where or args.out
    store = where / f"features{tag}.zarr"
    marker = where / f"extract{tag}.json"
    sig = signature(step="extract", teacher=teacher_sig, **({"views": views} if tag else {}),
                    **({"spatial": spatial} if spatial else {}))
    if marker.is_file() and json.loads(marker.read_text()).get("signature") == sig and store.exists():
        print(f"[quality] extract (K={views}): done before, reused ({store})", flush=True)
        record = json.loads(marker.read_text())
        record.setdefault("bytes_on_disk", open_store(str(store)).info()["bytes_on_disk"])
        return record, store
    print(f"[quality] extract the teacher's pts_neck, K={views} augmented views"
          + (f", BEV maps {spatial}x{spatial}" if spatial else "") + f" -> {store}", flush=True)
    seconds = bevcache("extract", "--config", TEACHER_CFG, "--checkpoint", ckpt, "--out", str(store),
                       "--data-root", str(args.data), "--overwrite", "--views", str(views),
                       *(["--spatial", f"pts_neck={spatial}"] if spatial else []),
                       log_file=args.out / "logs" / f"extract{tag}.log")
    record = {"signature": sig, "seconds": seconds, "store": rel(store), "views": views, "spatial_grid": spatial,
              "bytes_on_disk": open_store(str(store)).info()["bytes_on_disk"]}
    marker.write_text(json.dumps(record, indent=2))
    return record, store


def store_key(args, kind: str) -> tuple[int, bool] | None:
    if kind not in STORE_OF:
        return None
    views, spatial = STORE_OF[kind]
    return (args.views if views == "K" else views, spatial)


def student(args, variant: dict, seed: int, teacher_sig: str, stores: dict, ckpt: str) -> dict:
    """One student run; `stores` maps (views, spatial) to (extraction record, store path)."""
    kind = variant["kind"]
    key = store_key(args, kind)
    if kind in ("plain", "plain-aug"):
        extra, upstream = ["--plain"], None
    elif key is not None:
        extra = ["--cache", str(stores[key][1])]
        upstream = signature(teacher=teacher_sig, extract=stores[key][0]["signature"])
    else:
        extra = ["--teacher-online", TEACHER_CFG, "--teacher-checkpoint", ckpt]
        upstream = signature(teacher=teacher_sig)
    if kind in ("online-aug", "cached-keep"):
        extra += ["--distill", "augmentation=keep"]
    elif kind == "cached-replay":
        extra += ["--distill", "augmentation=replay"]
    config = REPLAY_STUDENT_CFG if kind in AUGMENTED else STUDENT_CFG
    if variant.get("config_distill"):
        config = str(write_config(args, variant["name"], config, variant["config_distill"]))
    for k, value in variant["distill"].items():
        extra += ["--distill", f"{k}={value}"]
    sig = signature(step="student", variant=variant["name"], distill=variant["distill"],
                    config_distill=variant.get("config_distill"), seed=seed, epochs=args.epochs,
                    batch=args.batch_size, train=args.train, val=args.val, data_seed=args.data_seed, upstream=upstream,
                    **({"views": args.views} if key and key[0] else {}))
    name = f"{variant['name']}-seed{seed}"
    return train_run(args, args.out / "runs" / name, args.out / "logs" / f"{name}.log", sig,
                     ["--student", config, *extra, *schedule_options(args, args.epochs, 1, seed, config)],
                     args.epochs, f"student {variant['label']}, seed {seed}")


# ---------------------------------------------------------------------------------------------
# Aggregation, verdicts, report


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(runs: list[dict]) -> dict:
    per_epoch_train = [statistics.fmean(r["train_seconds_per_epoch"].values()) for r in runs if r["train_seconds_per_epoch"]]
    curves: dict[int, list[tuple[float, float]]] = {}
    for r in runs:
        for h in r["history"]:
            curves.setdefault(int(h["step"]), []).append((h["mAP"], h["NDS"]))
    return {
        "n": len(runs),
        "mAP": mean_std([r["final"]["mAP"] for r in runs]),
        "NDS": mean_std([r["final"]["NDS"] for r in runs]),
        "wall_seconds": mean_std([r["seconds"] for r in runs]),
        "train_seconds_per_epoch": mean_std(per_epoch_train),
        "curve": {e: {"mAP": mean_std([m for m, _ in v]), "NDS": mean_std([n for _, n in v])}
                  for e, v in sorted(curves.items())},
    }


def compare(a: list[dict], b: list[dict], key: str) -> dict:
    """b - a on the final `key`: mean difference, its standard error, and seed-paired wins."""
    common = sorted({r["seed"] for r in a} & {r["seed"] for r in b})  # seeds both variants finished
    xa = [r["final"][key] for r in a if r["seed"] in common]
    xb = [r["final"][key] for r in b if r["seed"] in common]
    ma, sa = mean_std(xa)
    mb, sb = mean_std(xb)
    se = math.sqrt((sa**2 / len(xa) if len(xa) > 1 else 0) + (sb**2 / len(xb) if len(xb) > 1 else 0))
    paired = [y - x for x, y in zip(xa, xb, strict=False)]
    return {"delta": mb - ma, "se": se, "paired": paired, "wins": sum(d > 0 for d in paired), "n": len(paired)}


def verdicts(agg: dict, runs: dict, extract_seconds: float | None) -> list[str]:
    lines = []

    def diff_text(c: dict, key: str) -> str:
        se = f" ± {c['se']:.4f} (SE)" if c["se"] > 0 else " (one seed: no error bar)"
        return f"Δ{key} = {c['delta']:+.4f}{se}"

    if "cached" in runs and "online" in runs:
        c_map, c_nds = compare(runs["online"], runs["cached"], "mAP"), compare(runs["online"], runs["cached"], "NDS")
        close = all(abs(c["delta"]) <= 2 * c["se"] if c["se"] > 0 else abs(c["delta"]) < 0.01 for c in (c_map, c_nds))
        bound = "twice the standard error" if c_map["se"] > 0 else "0.01 (one seed, no error bar)"
        lines.append(f"- **(b) ≈ (c) in quality?** {'Yes' if close else 'No'}: cached − online "
                     f"{diff_text(c_map, 'mAP')}, {diff_text(c_nds, 'NDS')}"
                     + (f" — within {bound}." if close else f" — outside {bound}."))
    if "cached" in agg and "plain" in agg:
        ratio = agg["cached"]["train_seconds_per_epoch"][0] / agg["plain"]["train_seconds_per_epoch"][0]
        wall = agg["cached"]["wall_seconds"][0] / agg["plain"]["wall_seconds"][0]
        amort = ""
        if extract_seconds and "online" in agg:
            saved = agg["online"]["train_seconds_per_epoch"][0] - agg["cached"]["train_seconds_per_epoch"][0]
            if saved > 0:
                amort = (f" The one-off extraction ({extract_seconds:.0f} s) is repaid after "
                         f"{extract_seconds / saved:.1f} epochs against online CRD.")
        lines.append(f"- **(b) ≈ (a) in cost?** {'Yes' if ratio <= 1.05 else 'No'}: training time per epoch "
                     f"cached / plain = {ratio:.3f} (target ≤ 1.05); whole run incl. validation {wall:.3f}.{amort}")
        c = compare(runs["plain"], runs["cached"], "mAP")
        c_nds = compare(runs["plain"], runs["cached"], "NDS")
        if c["se"] > 0 and c["delta"] > 2 * c["se"]:
            verdict = "Yes"
        elif c["se"] > 0 and c["delta"] < -2 * c["se"]:
            verdict = "No, it is worse"
        else:
            verdict = "Not shown" if c["se"] > 0 else "Undecided (one seed)"
        lines.append(f"- **Does (b) beat (a)?** {verdict}: cached − plain {diff_text(c, 'mAP')}, "
                     f"{diff_text(c_nds, 'NDS')}; cached wins {c['wins']} of {c['n']} seed-paired runs on mAP.")
    for a, b, question in (("cached", "cached-replay", "Does replay (d) beat cached CRD without augmentation (b)?"),
                           ("online-aug", "cached-replay", "(d) ≈ online CRD with augmentation (c+)?"),
                           ("plain", "plain-aug", "Does augmentation help the plain student (a+ vs a)?"),
                           ("plain-aug", "cached-keep", "Does cached CRD with the augmentation kept (b+) beat plain augmented (a+)?"),
                           ("cached-keep", "cached-replay", "Replay (d) vs keep (b+) for pooled cached CRD?"),
                           ("cached-replay", "spatial-warp", "Spatial + warp (e) vs pooled CRD + replay (d)?"),
                           ("spatial-online", "spatial-warp", "Spatial cached + warp (e) ≈ spatial online (f)?"),
                           ("plain-aug", "spatial-warp", "Does spatial + warp (e) beat plain augmented (a+)?"),
                           ("spatial-warp", "crd-spatial-warp", "Does pooled CRD on top of spatial help (h vs e)?"),
                           ("spatial-warp", "spatial-replay", "Spatial replay (g) vs spatial warp (e)?")):
        if a in runs and b in runs and runs[a] and runs[b]:
            c_map, c_nds = compare(runs[a], runs[b], "mAP"), compare(runs[a], runs[b], "NDS")
            within = all(abs(c["delta"]) <= 2 * c["se"] for c in (c_map, c_nds)) if c_map["se"] > 0 else None
            verdict = {True: "within twice the SE", False: "beyond twice the SE", None: "one seed"}[within]
            lines.append(f"- **{question}** {LABELS[b].split()[0]} − {LABELS[a].split()[0]}: {diff_text(c_map, 'mAP')}, "
                         f"{diff_text(c_nds, 'NDS')} ({verdict}); {c_map['wins']} of {c_map['n']} seed-paired wins on mAP.")
    if "plain-aug" in agg:
        base = agg["plain-aug"]["train_seconds_per_epoch"][0]
        costs = [f"{LABELS[n].split()[0]} {agg[n]['train_seconds_per_epoch'][0] / base:.2f}x" for n in agg
                 if n in AUGMENTED and n != "plain-aug"]
        if costs:
            lines.append("- Training time per epoch relative to plain augmented (a+): " + ", ".join(costs) + ".")
    if "online" in agg and "plain" in agg:
        ratio = agg["online"]["train_seconds_per_epoch"][0] / agg["plain"]["train_seconds_per_epoch"][0]
        lines.append(f"- Online CRD costs {ratio:.2f}x plain training per epoch "
                     f"({agg['online']['train_seconds_per_epoch'][0] / agg['cached']['train_seconds_per_epoch'][0]:.2f}x cached)."
                     if "cached" in agg else f"- Online CRD costs {ratio:.2f}x plain training per epoch.")
    return lines


def fmt_ms(pair: tuple[float, float], digits: int = 4) -> str:
    m, s = pair
    return "-" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def plots(report_dir: Path, agg: dict, order: list[dict], teacher_final: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    files = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("mAP", "NDS"), strict=True):
        for v in order:
            curve = agg[v["name"]]["curve"]
            epochs = list(curve)
            mean = [curve[e][key][0] for e in epochs]
            std = [curve[e][key][1] for e in epochs]
            (line,) = ax.plot(epochs, mean, marker="o", label=v["label"])
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)], alpha=0.15, color=line.get_color())
        ax.axhline(teacher_final[key], color="k", ls="--", lw=1, label="teacher (final)")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"val {key}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Tiny student on synthetic nuScenes: validation over epochs (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(report_dir / "map_over_epochs.png", dpi=120)
    plt.close(fig)
    files.append("map_over_epochs.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [v["label"] for v in order]
    means = [agg[v["name"]]["train_seconds_per_epoch"][0] for v in order]
    stds = [agg[v["name"]]["train_seconds_per_epoch"][1] for v in order]
    bars = ax.bar(range(len(order)), means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(order))])
    for bar, m in zip(bars, means, strict=True):
        ax.annotate(f"{m:.0f} s", (bar.get_x() + bar.get_width() / 2, m), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(range(len(order)), names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("training seconds per epoch")
    ax.set_title("Training cost per epoch (validation excluded; mean ± std over seeds)", fontsize=10)
    ax.set_ylim(0, max(m + s for m, s in zip(means, stds, strict=True)) * 1.15)
    fig.tight_layout()
    fig.savefig(report_dir / "time_per_epoch.png", dpi=120)
    plt.close(fig)
    files.append("time_per_epoch.png")
    return files


def previous_table(path: Path, skip: set[str]) -> tuple[list[str], dict]:
    """Rows of an earlier results.json (variants not run now), labelled with its commit."""
    prev = json.loads(Path(path).read_text())
    where = prev.get("git", {}).get("short") or prev.get("commit") or "unrecorded"
    rows = {n: v for n, v in prev.get("variants", {}).items() if n not in skip}
    if not rows:
        return [], {}
    st = prev.get("settings", {})
    md = ["", f"## Earlier rows (not rerun): taken at commit {where}", "",
          f"From `{rel(path)}` ({prev.get('note', '')}): {st.get('train')} train / {st.get('val')} val, teacher "
          f"{st.get('teacher_epochs')} epochs, student {st.get('epochs')} epochs, {st.get('seeds')} seeds "
          "(their mean ± std is over all their seeds; not seed-paired with the runs above, and taken at an older "
          "commit with a different teacher run: compare with care).", "",
          "| model | seeds | mAP (final) | NDS (final) | train s/epoch |", "|---|---|---|---|---|"]
    t = prev.get("teacher")
    if t:
        md.append(f"| teacher (that run) | 1 | {t['final']['mAP']:.4f} | {t['final']['NDS']:.4f} | - |")
    for v in rows.values():
        a = v["aggregate"]
        md.append(f"| {v['label']} | {a['n']} | {fmt_ms(a['mAP'])} | {fmt_ms(a['NDS'])} | "
                  f"{fmt_ms(a['train_seconds_per_epoch'], 0)} |")
    return md, {"from": rel(path), "commit": where, "variants": {n: v["aggregate"] for n, v in rows.items()}}


def report(args, order: list[dict], runs: dict, teacher_rec: dict, extract_rec: dict | None, *, seeds_done: int,
           spatial_recs: dict | None = None) -> None:
    import torch

    args.report_dir.mkdir(parents=True, exist_ok=True)
    agg = {name: aggregate(rs) for name, rs in runs.items() if rs}
    order = [v for v in order if v["name"] in agg]
    extract_seconds = extract_rec["seconds"] if extract_rec else None
    lines = verdicts(agg, runs, extract_seconds)
    files = plots(args.report_dir, agg, order, teacher_rec["final"]) if order else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU {cpu}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}"
    nce_k = min(16384, args.train - 1)
    state = git_state(args.measured_at, own_outputs=args.report_dir)
    md = [
        "# bevcache quality report" + (" (QUICK SMOKE RUN: not a result)" if args.quick else ""),
        "",
        *([f"**Partial: {seeds_done} of {args.seeds} seeds finished so far.**", ""]
          if seeds_done < args.seeds and not args.report_only else []),
        *([f"**Partial: not every variant finished {args.seeds} seeds** (seeds per variant: "
           + ", ".join(f"{v['label'].split()[0]} {len(runs[v['name']])}" for v in order)
           + "); deltas below pair only the seeds both variants finished.", ""]
          if args.report_only and any(len(runs[v["name"]]) < args.seeds for v in order) else []),
        f"Synthetic nuScenes-format data: {args.train} train / {args.val} val samples (data seed {args.data_seed}). "
        f"Teacher `{TEACHER_CFG}` (pts_neck 512) trained {args.teacher_epochs} epoch(s); student `{STUDENT_CFG}` "
        f"(pts_neck 256) trained {args.epochs} epoch(s) per run with validation after every epoch, "
        f"{args.seeds} seed(s) per variant (`randomness.seed` = 0..{args.seeds - 1}), batch size {args.batch_size or 4}. "
        f"CRD: the config's `distill` settings (alpha 1, feat_dim 128, nce_t 0.07, nce_m 0.5), n_data = {args.train}, "
        f"nce_k clamped to {nce_k}. Device: {device}.",
        "",
        (f"Measured at commit `{state['commit']}`" + (" on a clean tree." if state["clean"] else
                                                       f" **with local changes** to {state['dirty_files']}."))
        if not state.get("measured_at") else
        (f"Runs and stores taken at commit `{state['measured_at']}` (a git worktree pinned there, clean tree); "
         f"report assembled from their records with `--report-only` at `{state['commit']}`, which differs from it "
         + (f"in {state['changed_since']}." if state["changed_since"] else "in nothing.")),
        "",
        "| model | seeds | mAP (final) | NDS (final) | train s/epoch | wall clock per run |",
        "|---|---|---|---|---|---|",
        f"| teacher (pts_neck 512) | 1 | {teacher_rec['final']['mAP']:.4f} | {teacher_rec['final']['NDS']:.4f} | "
        f"{fmt_ms(mean_std(list(teacher_rec['train_seconds_per_epoch'].values())), 0)} | {teacher_rec['seconds']:.0f} s |",
    ]
    for v in order:
        a = agg[v["name"]]
        md.append(f"| {v['label']} | {a['n']} | {fmt_ms(a['mAP'])} | {fmt_ms(a['NDS'])} | "
                  f"{fmt_ms(a['train_seconds_per_epoch'], 0)} | {fmt_ms(a['wall_seconds'], 0)} s |")
    if extract_rec:
        md += ["", f"Extraction (`bevcache extract`, once, {args.train} samples): {extract_rec['seconds']:.0f} s wall clock."]
    by_views = (extract_rec or {}).get("by_views") or {}
    if len(by_views) > 1 and 0 in by_views:
        base = by_views[0]
        md += ["", f"Extraction cost by K augmented views per sample ({args.train} samples, whole command incl. "
                   "start-up; pts_neck 512-d float16):", "",
               "| K | wall clock | × K=0 | store on disk | bytes per sample |", "|---|---|---|---|---|"]
        for k, rec in sorted(by_views.items(), key=lambda kv: int(kv[0])):
            md.append(f"| {k} | {rec['seconds']:.1f} s | {rec['seconds'] / base['seconds']:.2f} | "
                      f"{rec['bytes_on_disk'] / 1024:.0f} KiB | {rec['bytes_on_disk'] / args.train:.0f} |")
    if spatial_recs:
        g = args.spatial_grid
        md += ["", f"Stores the students trained on (`bevcache extract`, {args.train} samples, whole command incl. "
                   f"start-up; spatial = `--spatial pts_neck={g}`: the pooled 512-d vector plus the 512 x {g} x {g} "
                   "float16 BEV map per sample and view):", "",
               "| store | views K | spatial | wall clock | store on disk | bytes per sample |",
               "|---|---|---|---|---|---|"]
        for rec in spatial_recs.values():
            md.append(f"| `{Path(rec['store']).name}` | {rec.get('views', 0)} | "
                      f"{f'{g}x{g}' if rec.get('spatial_grid') else '-'} | {rec['seconds']:.1f} s | "
                      f"{rec['bytes_on_disk'] / 2**20:.2f} MiB | {rec['bytes_on_disk'] / args.train:.0f} |")
    md += ["", "mean ± std over seeds; train s/epoch = mean logged iteration time × iterations per epoch "
               "(validation and start-up excluded); wall clock = the whole `bevcache train` command.", "",
           "## Verdict", "", *lines, ""]
    md += [f"![{f}]({f})" for f in files]
    md += ["", "## Per run", "", "| variant | seed | mAP | NDS | wall s | mAP by epoch |", "|---|---|---|---|---|---|"]
    for v in order:
        for r in runs[v["name"]]:
            curve = " ".join(f"{h['mAP']:.3f}" for h in r["history"])
            md.append(f"| {v['label']} | {r['seed']} | {r['final']['mAP']:.4f} | {r['final']['NDS']:.4f} | "
                      f"{r['seconds']:.0f} | {curve} |")
    prev_md, prev = previous_table(Path(args.previous), {v["name"] for v in order}) if args.previous else ([], {})
    md += prev_md
    cmd = "pipelines/quality/run.py " + " ".join(rel(a) if a.startswith("/") else a for a in sys.argv[1:])
    md += ["", f"Reproduce: `.venv/bin/python {cmd.strip()}` at commit {state['short']} "
               f"(finished runs under `{rel(args.out)}` are reused)."]
    (args.report_dir / "report.md").write_text("\n".join(md) + "\n")
    results = {
        "settings": {k: rel(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "git": state,
        "seeds_done": seeds_done,
        "device": device, "teacher": teacher_rec, "extract": extract_rec,
        "spatial_stores": spatial_recs or {},
        "variants": {v["name"]: {**v, "aggregate": agg[v["name"]], "runs": runs[v["name"]]} for v in order},
        "previous": prev,
        "verdict": lines,
    }
    (args.report_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print("\n" + "\n".join(md[:8 + len(order)]) + "\n\n" + "\n".join(lines))
    print(f"\nreport: {args.report_dir / 'report.md'}")
    if not state["clean"]:
        print(f"[quality] WARNING: the tree has local changes ({state['dirty_files']}): not a clean measurement",
              flush=True)


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)
    # OpenMP threads that spin while they wait are ruinous on a shared machine: with 2 threads on
    # 2 loaded cores, a conv stack ran 14x slower than with passive waiting (6.3 s vs 0.44 s per
    # step). The `bevcache` commands inherit this.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    order = variants(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.data / "nuscenes_infos_val.pkl").is_file():
        if args.data.exists():
            shutil.rmtree(args.data)
        bevcache("synth", str(args.data), "--samples", str(args.train), "--val-samples", str(args.val),
                 "--seed", str(args.data_seed), log_file=args.out / "logs" / "synth.log")
    teacher_rec, ckpt = teacher(args)
    tsig = teacher_rec["signature"]
    kinds = {v["kind"] for v in order}
    extract_rec, stores = None, {}
    needed = {store_key(args, k) for k in kinds} - {None}
    if (0, False) in needed or kinds & {"online", "online-aug"}:
        extract_rec, path = extract(args, tsig, ckpt)
        stores[(0, False)] = (extract_rec, path)
    # Extraction cost by K: every K extracted back to back under the same conditions.
    cost = {k: extract(args, tsig, ckpt, views=k, where=args.out / "views-cost")
            for k in sorted({int(k) for k in args.views_cost.split(",") if k})}
    if (args.views, False) in needed:
        stores[(args.views, False)] = cost[args.views] if args.views in cost else \
            extract(args, tsig, ckpt, views=args.views)
    for views, _spatial in sorted(k for k in needed if k[1]):
        stores[(views, True)] = extract(args, tsig, ckpt, views=views, spatial=args.spatial_grid)
    if extract_rec:
        extract_rec = dict(extract_rec, by_views={k: rec for k, (rec, _) in cost.items()})
    spatial_recs = {f"K={v}{' spatial' if sp else ''}": rec for (v, sp), (rec, _) in sorted(stores.items())}
    runs: dict[str, list[dict]] = {v["name"]: [] for v in order}
    # Seed-major order, and a report after every seed: an interrupted recipe still has a report
    # in which every variant has the same seeds.
    for seed in range(args.seeds):
        for v in order:
            record = student(args, v, seed, tsig, stores, ckpt)
            if record is not None:
                runs[v["name"]].append({**record, "seed": seed})
        if args.report_only and seed < args.seeds - 1:
            continue
        report(args, order, runs, teacher_rec, extract_rec, seeds_done=seed + 1, spatial_recs=spatial_recs)


if __name__ == "__main__":
    main()
