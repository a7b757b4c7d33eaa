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
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "w") as fh:
            proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode:
            tail = log_file.read_text().splitlines()[-30:]
            sys.exit(f"command failed (exit {proc.returncode}), last lines of {log_file}:\n" + "\n".join(tail))
    return time.perf_counter() - t0


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


def threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
