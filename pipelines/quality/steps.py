"""The recipe's steps (data, teacher training, extraction, student runs), each resumable.

A finished step leaves a record under `--records` (committed: docs/quality/records by default), at
the step's path relative to `--out` (`teachers/T1.json`, `runs/T3-spatial-seed0.json`,
`stores/T1-views20-spatial32.json`, ...), holding its settings signature, metrics, wall clock and
the commit it ran at; a trained teacher also leaves its weights there (`teachers/T1.pth`). The
records are the matrix's state: work dirs and stores are scratch, so a fresh clone with the records
resumes where the last session stopped (a missing store is extracted again from the recorded
teacher weights). A step whose record matches is reused; an unfinished or outdated one is deleted
and run again from scratch, so every recorded wall clock is one uninterrupted run.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import pickle
import shutil
import statistics
import sys
import time
from pathlib import Path

from common import REPO, bevcache, class_ap, git_state, val_history
from matrix import CLASSES, STUDENT_CFG, TEACHERS
from options import absolute, iters_per_epoch


def signature(**parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rel(path: str | Path) -> str:
    """A path as committed outputs hold it: relative to the repository when inside it."""
    path = absolute(path)
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def record_path(args: argparse.Namespace, step_dir: Path, suffix: str = ".json") -> Path:
    """Where the record of the step working in `step_dir` (a path under --out) lives."""
    step = absolute(step_dir).relative_to(args.out)
    return args.records / step.parent / (step.name.removesuffix(".zarr") + suffix)


def write_record(args: argparse.Namespace, step_dir: Path, record: dict) -> None:
    path = record_path(args, step_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def load_marker(marker: Path, sig: str) -> dict | None:
    if marker.is_file():
        record = json.loads(marker.read_text())
        if record.get("signature") == sig:
            return record
    return None


def tree_state(args: argparse.Namespace) -> dict:
    """The commit a step runs at; refuses a dirty tree unless allowed (a smoke run always is)."""
    state = git_state(own_outputs=args.report_dir)
    if not state["clean"] and not (args.allow_dirty or args.quick):
        sys.exit(f"[quality] the tree has local changes ({state['dirty_files']}): a measurement must name one "
                 "commit. Run from a clean worktree (`git worktree add ../quality-wt HEAD`) or pass --allow-dirty.")
    return {**{k: state[k] for k in ("commit", "short", "clean", "dirty_files")}, **code_commit()}


# What a step executes. Sessions commit records, docs, tests and benchmarks between pieces, which
# moves HEAD but not what is measured; a change here does, and then the report sees two code commits.
CODE_PATHS = ("bevcache", "bevcache_cli.py", "configs", "pipelines", "pyproject.toml", "requirements", "scripts",
              "Makefile", ":(exclude)*.md")


def code_commit() -> dict:
    """The commit the code a step runs (CODE_PATHS) was last changed at."""
    import subprocess

    out = subprocess.run(["git", "log", "-1", "--format=%H %h", "--", *CODE_PATHS],
                         cwd=REPO, capture_output=True, text=True).stdout.split()
    return {"code_commit": out[0], "code_short": out[1]} if len(out) == 2 else {}


# ---------------------------------------------------------------------------------------------
# Data


def data_parts(args: argparse.Namespace) -> dict:
    """What the data adds to every step's signature. The cue's LiDAR trace only where there is one, so
    the camera-only matrix's recorded signatures stay valid."""
    parts: dict = dict(train=args.train, val=args.val, data_seed=args.data_seed)
    if args.cue_lidar_trace:
        parts["cue_lidar_trace"] = args.cue_lidar_trace
    return parts


def ensure_data(args: argparse.Namespace) -> None:
    """The synthetic root with cameras, made once; an existing one must be a camera root of these sizes
    and this cue trace."""
    if (args.data / "nuscenes_infos_val.pkl").is_file():
        counts, cameras, traces = {}, True, set()
        for split in ("train", "val"):
            with open(args.data / f"nuscenes_infos_{split}.pkl", "rb") as fh:
                infos = pickle.load(fh)
            samples = infos["data_list"]
            counts[split] = len(samples)
            cameras &= all(info.get("images") for info in samples)
            cue = infos.get("metainfo", {}).get("synth_camera_cue") or {}
            traces.add((cue.get("lidar_trace") or {}).get("relative_intensity_difference", 0.0))
        if counts != {"train": args.train, "val": args.val} or not cameras:
            sys.exit(f"{rel(args.data)} holds {counts} samples{'' if cameras else ' without cameras'}; the recipe "
                     f"wants {args.train} / {args.val} with cameras. Delete it or pass --data.")
        if traces != {args.cue_lidar_trace}:
            sys.exit(f"{rel(args.data)} was made with cue LiDAR trace {', '.join(f'{t:g}' for t in sorted(traces))}; "
                     f"the recipe wants --cue-lidar-trace {args.cue_lidar_trace:g}. Pass the --data that has it, "
                     f"or delete {rel(args.data)} to make it again.")
        return
    if args.data.exists():
        shutil.rmtree(args.data)  # an interrupted synth
    trace = ("--cue-lidar-trace", f"{args.cue_lidar_trace!r}") if args.cue_lidar_trace else ()
    bevcache("synth", str(args.data), "--cameras", *trace, "--samples", str(args.train), "--val-samples",
             str(args.val), "--seed", str(args.data_seed), log_file=args.out / "logs" / "synth.log")


# ---------------------------------------------------------------------------------------------
# Training


@functools.cache
def box_cap_items(config: str) -> tuple[str, ...]:
    """Keep CenterPoint's boxes per sample within the nuScenes devkit's 500 (it asserts on more): a
    CenterHead keeps up to `post_max_size` per task, and a barely trained model reaches it. Lowered
    only when the config allows more than 500 (the tiny configs now keep 6 x 83)."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(REPO / config), import_custom_modules=False)
    head, test = cfg.model.get("pts_bbox_head") or {}, (cfg.model.get("test_cfg") or {}).get("pts") or {}
    tasks, per_task = len(head.get("tasks", [])), test.get("post_max_size")
    if not tasks or not per_task or tasks * per_task <= 500 or test.get("nms_type") is None:
        return ()
    return (f"model.test_cfg.pts.post_max_size={500 // tasks}",)


def schedule_options(args: argparse.Namespace, epochs: int, val_interval: int, seed: int, config: str,
                     samples: int | None = None) -> list[str]:
    """`--cfg-options` items for an `epochs`-long cosine schedule; iteration times are logged every
    min(10, iterations per epoch) iterations so even a tiny epoch logs its time."""
    log_every = min(10, iters_per_epoch(args, samples))
    items = [f"train_cfg.max_epochs={epochs}", f"train_cfg.val_interval={val_interval}",
             f"param_scheduler.1.end={epochs}", f"param_scheduler.1.T_max={epochs}", f"randomness.seed={seed}",
             f"default_hooks.logger.interval={log_every}", f"log_processor.window_size={log_every}",
             *box_cap_items(config)]
    if args.batch_size:
        items.append(f"train_dataloader.batch_size={args.batch_size}")
    return [arg for item in items for arg in ("--cfg-options", item)]


def epoch_times(work_dir: Path, iterations: int) -> dict[int, float]:
    """Training seconds per epoch: mean logged iteration time x iterations (validation excluded)."""
    per_epoch: dict[int, list[float]] = {}
    for scalars in sorted(Path(work_dir).glob("*/vis_data/scalars.json")):
        for line in scalars.read_text().splitlines():
            row = json.loads(line)
            if "epoch" in row and "time" in row and "iter" in row:
                per_epoch.setdefault(int(row["epoch"]), []).append(float(row["time"]))
    return {e: statistics.fmean(t) * iterations for e, t in sorted(per_epoch.items())}


def finished_run(args: argparse.Namespace, work_dir: Path, sig: str) -> dict | None:
    return load_marker(record_path(args, work_dir), sig)


def train_run(args: argparse.Namespace, work_dir: Path, sig: str, train_args: list[str], what: str, *,
              data: Path | None = None, samples: int | None = None) -> dict:
    """`bevcache train` into work_dir unless a matching record is there; returns its record."""
    done = finished_run(args, work_dir, sig)
    if done:
        print(f"[quality] {what}: done before, reused ({rel(work_dir)})", flush=True)
        return done
    state = tree_state(args)
    if work_dir.exists():
        print(f"[quality] {rel(work_dir)} is unfinished or outdated: starting it again", flush=True)
        shutil.rmtree(work_dir)
    log = args.out / "logs" / f"{work_dir.relative_to(args.out).as_posix().replace('/', '--')}.log"
    print(f"[quality] {what} -> {rel(work_dir)} (log {rel(log)})", flush=True)
    seconds = bevcache("train", *train_args, "--work-dir", str(work_dir), "--data-root", str(data or args.data),
                       log_file=log)
    history = val_history(work_dir)
    if not history:
        sys.exit(f"{what}: no validation metrics under {work_dir}; see {log}")
    record = {"signature": sig, "what": what, "seconds": seconds, "history": history, "final": history[-1],
              "class_ap": class_ap(work_dir, CLASSES),
              "train_seconds_per_epoch": epoch_times(work_dir, iters_per_epoch(args, samples)),
              "git": state, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_record(args, work_dir, record)
    return record


# ---------------------------------------------------------------------------------------------
# Teachers and their stores


def teacher_sig(args: argparse.Namespace, key: str) -> str:
    return signature(step="teacher", teacher=key, config=TEACHERS[key].config, **data_parts(args),
                     epochs=args.teacher_epochs[key], batch=args.batch_size,
                     val_every=args.teacher_val_every, cameras=True)


def teacher_dir(args: argparse.Namespace, key: str) -> Path:
    return args.out / "teachers" / key


def teacher(args: argparse.Namespace, key: str) -> tuple[dict, str]:
    """Train teacher `key` (plain, its own augmented pipeline); returns its record and weights."""
    cfg, epochs, work_dir = TEACHERS[key].config, args.teacher_epochs[key], teacher_dir(args, key)
    weights, exported = Path(teacher_checkpoint(args, key)), work_dir / "student_weights.pth"
    if weights_signature(weights) != teacher_sig(args, key) and finished_run(args, work_dir, teacher_sig(args, key)) \
            and not exported.is_file():
        sys.exit(f"[quality] {rel(record_path(args, work_dir))} records teacher {key} as trained but its weights "
                 f"{rel(weights)} are missing or were trained under other settings: restore them from git, or delete "
                 "the record to train it again.")
    record = train_run(args, work_dir, teacher_sig(args, key),
                       ["--student", cfg, "--plain",
                        *schedule_options(args, epochs, min(args.teacher_val_every, epochs), 0, cfg)],
                       f"teacher {TEACHERS[key].label}, {epochs} epochs")
    if weights_signature(weights) != teacher_sig(args, key):  # none yet, or an earlier schedule's
        publish_weights(exported, weights, key, teacher_sig(args, key))
    return record, str(weights)


def weights_signature(weights: Path) -> str | None:
    """The teacher signature published weights were trained under (None when there are none)."""
    from bevcache.teacher import load_checkpoint_file

    return load_checkpoint_file(weights).get("meta", {}).get("signature") if weights.is_file() else None


def publish_weights(exported: Path, out: Path, key: str, sig: str) -> None:
    """The trained teacher's weights beside its record (weights only, no optimizer: what extraction
    and an online teacher load), so a later session extracts from the very same teacher."""
    from mmengine.runner import save_checkpoint

    from bevcache.teacher import load_checkpoint_file

    state = load_checkpoint_file(exported)["state_dict"]
    tmp = out.with_suffix(".tmp")
    save_checkpoint({"state_dict": state, "meta": {"teacher": key, "signature": sig}}, str(tmp))
    tmp.replace(out)


def teacher_checkpoint(args: argparse.Namespace, key: str) -> str:
    return str(record_path(args, teacher_dir(args, key), ".pth"))


def store_sig(args: argparse.Namespace, key: str, data_tag: str = "") -> str:
    return signature(step="extract", teacher=teacher_sig(args, key), views=args.views, grid=args.spatial_grid,
                     data=data_tag)


def store_path(args: argparse.Namespace, key: str, where: Path | None = None) -> Path:
    return (where or args.out / "stores") / f"{key}-views{args.views}-spatial{args.spatial_grid}.zarr"


def store_complete(store: Path) -> bool:
    from bevcache.store import open_store

    try:
        return bool(open_store(str(store)).info()["complete"])
    except Exception:  # absent, or not a store (an interrupted first write)
        return False


def extract(args: argparse.Namespace, key: str, *, data: Path | None = None, where: Path | None = None,
            data_tag: str = "") -> tuple[dict, Path]:
    """One store per teacher: its pooled pts_neck and the G x G map, for the sample and K augmented
    views (so augmentation='auto' replays them for the pooled and the spatial student alike)."""
    from bevcache.store import open_store

    store = store_path(args, key, where)
    sig = store_sig(args, key, data_tag)
    done = load_marker(record_path(args, store), sig)
    if done and store_complete(store):
        print(f"[quality] extract {key}: done before, reused ({rel(store)})", flush=True)
        return done, store
    if done:  # a fresh clone: same teacher weights, same views, so the same store; the first record stays
        print(f"[quality] extract {key}: recorded, but {rel(store)} is not here: extracting it again", flush=True)
    state = tree_state(args)
    store.parent.mkdir(parents=True, exist_ok=True)
    print(f"[quality] extract {key}'s pts_neck, K={args.views} views, maps {args.spatial_grid}x{args.spatial_grid} "
          f"-> {rel(store)}", flush=True)
    seconds = bevcache("extract", "--config", TEACHERS[key].config, "--checkpoint", teacher_checkpoint(args, key),
                       "--out", str(store), "--data-root", str(data or args.data), "--overwrite",
                       "--views", str(args.views), "--spatial", f"pts_neck={args.spatial_grid}",
                       log_file=args.out / "logs" / f"extract-{store.stem}.log")
    if done:
        return done, store
    record = {"signature": sig, "seconds": seconds, "store": rel(store), "views": args.views,
              "spatial_grid": args.spatial_grid, "bytes_on_disk": open_store(str(store)).info()["bytes_on_disk"],
              "git": state}
    write_record(args, store, record)
    return record, store


# ---------------------------------------------------------------------------------------------
# Student variants


def write_config(args: argparse.Namespace, name: str, distill: dict) -> Path:
    """A student config = STUDENT_CFG with these `distill` settings (layers={} removes pooled CRD).
    Generated because `--distill k=v` cannot carry the nested spatial dict reliably."""
    path = args.out / "configs" / f"{name}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    items = {k: ({"_delete_": True} if k == "layers" and not v else v) for k, v in distill.items()}
    path.write_text(f"_base_ = [{str(REPO / STUDENT_CFG)!r}]\ndistill = {items!r}\n")
    return path


def spatial_distill(settings: dict, *, online_teacher: str | None = None, grid: int = 32) -> dict:
    """`distill` for a spatial-only student: the tuned spatial settings on pts_neck, no pooled CRD.

    Online, bevcache records only the teacher's pooled `layers`, so layers={} would leave the map
    unrecorded ("produced no output"): the pooled layer stays with alpha=0 (no CRD gradient), and
    the map's channels and grid are given as a store would record them."""
    spatial = {"layers": {"pts_neck": "pts_neck"}, **settings}
    if online_teacher is None:
        return {"layers": {}, "spatial": spatial, "augmentation": "auto"}
    spatial.update(channels=TEACHERS[online_teacher].channels, grid=(grid, grid))
    return {"spatial": spatial, "alpha": 0.0, "augmentation": "keep"}


def student_args(args: argparse.Namespace, name: str, kind: str, teacher_key: str | None, store: Path | None,
                 spatial_settings: dict | None) -> list[str]:
    """`bevcache train` arguments for one variant (schedule options excluded)."""
    if kind == "plain":
        return ["--student", STUDENT_CFG, "--plain"]
    if kind == "pooled":
        return ["--student", STUDENT_CFG, "--cache", str(store), "--distill", "augmentation=auto"]
    if kind == "spatial":
        return ["--student", str(write_config(args, name, spatial_distill(spatial_settings or {}))),
                "--cache", str(store)]
    online = ["--teacher-online", TEACHERS[teacher_key].config,
              "--teacher-checkpoint", teacher_checkpoint(args, teacher_key)]
    if kind == "online-pooled":  # the live teacher sees the student's augmented batch, fresh each step
        return ["--student", STUDENT_CFG, *online, "--distill", "augmentation=keep"]
    if kind == "online-spatial":
        cfg = write_config(args, name, spatial_distill(spatial_settings or {}, online_teacher=teacher_key,
                                                        grid=args.spatial_grid))
        return ["--student", str(cfg), *online]
    raise ValueError(kind)
