"""Helpers shared by the recipes in pipelines/: run a bevcache command, read a run's metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAP_KEY = "NuScenes metric/pred_instances_3d_NuScenes/mAP"
NDS_KEY = "NuScenes metric/pred_instances_3d_NuScenes/NDS"


def bevcache(*args: str, log_file: Path | None = None) -> float:
    """Run `bevcache ARGS` from the repo root, streaming or logging its output; returns seconds."""
    cmd = [sys.executable, "-m", "bevcache.cli", *args]
    print("$ bevcache " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    if log_file is None:
        subprocess.run(cmd, cwd=REPO, check=True)
    else:
        # Everything goes to the log; progress lines (mmengine's epoch/iter lines, metrics,
        # bevcache's own messages) are echoed, so a long step still shows it is moving.
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "w") as fh:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                fh.write(line)
                if any(key in line for key in PROGRESS_MARKERS):
                    print("   " + _shorten(line.rstrip()), flush=True)
            proc.wait()
        if proc.returncode:
            tail = log_file.read_text().splitlines()[-30:]
            sys.exit(f"command failed (exit {proc.returncode}), last lines of {log_file}:\n" + "\n".join(tail))
    return time.perf_counter() - t0


PROGRESS_MARKERS = ("Epoch(train)", "Epoch(val)", "bevcache INFO", "bevcache WARNING", "error:")


def _shorten(line: str) -> str:
    """mmengine's lines list every loss / per-class metric; keep what shows progress."""
    import re

    head = re.search(r"Epoch\((train|val)\)\s*\[\d+\](\[\s*\d+/\d+\])?", line)
    if not head:
        return line[:160]
    fields = [head.group(0)]
    for key in ("eta", "time", "loss", "mAP", "NDS"):
        match = re.search(rf"(?:^|\s|/){key}: ([0-9.:e-]+)", line)
        if match:
            fields.append(f"{key} {match.group(1)}")
    return "  ".join(fields)


def val_history(work_dir: Path) -> list[dict]:
    """Every validation record (step, mAP, NDS) the Runner logged in work_dir, oldest first."""
    records = []
    for scalars in sorted(Path(work_dir).glob("*/vis_data/scalars.json")):
        for line in scalars.read_text().splitlines():
            row = json.loads(line)
            if MAP_KEY in row:
                records.append({"step": row.get("step"), "mAP": row[MAP_KEY], "NDS": row.get(NDS_KEY)})
    return records


def final_metrics(work_dir: Path) -> dict:
    """The last validation record of a run (mAP, NDS)."""
    history = val_history(work_dir)
    if not history:
        raise RuntimeError(f"no validation metrics found under {work_dir}")
    return history[-1]


def class_ap(work_dir: Path, classes: tuple[str, ...] | list[str]) -> dict[str, float]:
    """Per-class AP of a run's last validation: the mean over the devkit's distance thresholds of
    NuScenesMetric's `<class>_AP_dist_<d>` keys (how nuScenes' mAP averages them, per class)."""
    prefix = MAP_KEY.rsplit("/", 1)[0] + "/"
    last = None
    for scalars in sorted(Path(work_dir).glob("*/vis_data/scalars.json")):
        for line in scalars.read_text().splitlines():
            row = json.loads(line)
            if MAP_KEY in row:
                last = row
    if last is None:
        raise RuntimeError(f"no validation metrics found under {work_dir}")
    out = {}
    for name in classes:
        aps = [v for k, v in last.items() if k.startswith(f"{prefix}{name}_AP_dist_")]
        if not aps:
            raise RuntimeError(f"no {name}_AP_dist_* keys in the last validation under {work_dir}")
        out[name] = sum(aps) / len(aps)
    return out


def threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))


def git_state(measured_at: str | None = None, own_outputs: Path | None = None) -> dict:
    """The commit the measurements are taken at, and whether the tree is clean. `own_outputs` (the
    report dir) does not count: the report written after seed 0 must not mark seed 1 as dirty."""
    import subprocess

    def git(*a, strip=True):
        out = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout
        return out.strip() if strip else out

    pathspec = ["--", "."]
    own = Path(own_outputs).resolve() if own_outputs is not None else None
    if own is not None and own.is_relative_to(REPO):
        pathspec.append(f":(exclude){own.relative_to(REPO)}")
    dirty = [ln for ln in git("status", "--porcelain", "--untracked-files=no", *pathspec, strip=False).splitlines()
             if ln.strip()]
    state = {"commit": git("rev-parse", "HEAD"), "short": git("rev-parse", "--short", "HEAD"), "clean": not dirty,
             "dirty_files": [ln[3:] for ln in dirty]}
    if measured_at:
        state["measured_at"] = git("rev-parse", measured_at)
        state["short"] = git("rev-parse", "--short", measured_at)
        state["changed_since"] = git("diff", "--name-only", measured_at, "HEAD").split()
    return state
