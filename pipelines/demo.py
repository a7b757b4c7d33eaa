"""`make demo`: the whole bevcache job end to end on synthetic nuScenes-format data, on CPU.

synth data -> train the tiny teacher -> extract its pts_neck to a Zarr store -> train the tiny
student plainly and with cached CRD (same seed, schedule and data) -> a table of mAP/NDS and time.
Sizes are small so it finishes in about ten minutes on 2 cores; pipelines/quality is the real test.
Outputs: data/synthetic-nus/, work_dirs/demo/ (logs, checkpoints, features.zarr, results.json).
"""

from __future__ import annotations

import json
import os

from common import REPO, bevcache, final_metrics

TRAIN = int(os.environ.get("DEMO_TRAIN_SAMPLES", 200))
VAL = int(os.environ.get("DEMO_VAL_SAMPLES", 50))
TEACHER_EPOCHS = int(os.environ.get("DEMO_TEACHER_EPOCHS", 4))
STUDENT_EPOCHS = int(os.environ.get("DEMO_STUDENT_EPOCHS", 3))
DATA = REPO / "data" / "synthetic-nus"
OUT = REPO / "work_dirs" / "demo"
DOCS = REPO / "docs" / "demo"


def git_state() -> dict:
    """The commit these results describe, and whether the tree had uncommitted changes."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def cfg_options(max_epochs: int) -> list[str]:
    """Train for max_epochs with one validation at the end (cosine schedule follows)."""
    items = [f"train_cfg.max_epochs={max_epochs}", f"train_cfg.val_interval={max_epochs}",
             f"param_scheduler.1.end={max_epochs}", f"param_scheduler.1.T_max={max_epochs}"]
    return [arg for item in items for arg in ("--cfg-options", item)]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    if not (DATA / "nuscenes_infos_val.pkl").is_file():
        times["synth"] = bevcache("synth", str(DATA), "--samples", str(TRAIN), "--val-samples", str(VAL), "--seed", "0")
    print(f"[demo 1/4] train the teacher ({TEACHER_EPOCHS} epochs); log: {OUT / 'teacher.log'}", flush=True)
    times["teacher"] = bevcache("train", "--student", "configs/tiny_teacher.py", "--plain", "--work-dir", str(OUT / "teacher"),
                                "--data-root", str(DATA), *cfg_options(max_epochs=TEACHER_EPOCHS), log_file=OUT / "teacher.log")
    teacher_ckpt = (OUT / "teacher" / "last_checkpoint").read_text().strip()
    print("[demo 2/4] extract the teacher's pts_neck once", flush=True)
    times["extract"] = bevcache("extract", "--config", "configs/tiny_teacher.py", "--checkpoint", teacher_ckpt,
                                "--out", str(OUT / "features.zarr"), "--data-root", str(DATA), "--overwrite")
    bevcache("info", str(OUT / "features.zarr"))
    student_opts = ["--data-root", str(DATA), *cfg_options(max_epochs=STUDENT_EPOCHS)]
    print(f"[demo 3/4] train the student plainly ({STUDENT_EPOCHS} epochs)", flush=True)
    times["student plain"] = bevcache("train", "--student", "configs/tiny_student.py", "--plain", "--work-dir",
                                      str(OUT / "student_plain"), *student_opts, log_file=OUT / "student_plain.log")
    print("[demo 4/4] train the student with CRD against the cached teacher", flush=True)
    times["student + CRD"] = bevcache("train", "--student", "configs/tiny_student.py", "--cache", str(OUT / "features.zarr"),
                                      "--work-dir", str(OUT / "student_crd"), *student_opts, log_file=OUT / "student_crd.log")
    rows = [
        ("teacher (pts_neck 512)", final_metrics(OUT / "teacher"), times["teacher"]),
        ("student plain (256)", final_metrics(OUT / "student_plain"), times["student plain"]),
        ("student + cached CRD", final_metrics(OUT / "student_crd"), times["student + CRD"]),
    ]
    lines = [f"bevcache demo: {TRAIN} train / {VAL} val synthetic samples, extraction {times['extract']:.0f} s", "",
             f"| {'model':<24} | {'mAP':>6} | {'NDS':>6} | {'train s':>7} |",
             f"|{'-' * 26}|{'-' * 8}|{'-' * 8}|{'-' * 9}|"]
    lines += [f"| {name:<24} | {m['mAP']:6.3f} | {m['NDS']:6.3f} | {sec:7.0f} |" for name, m, sec in rows]
    print("\n" + "\n".join(lines))
    results = {"samples": {"train": TRAIN, "val": VAL}, "seconds": times,
               "metrics": {name: m for name, m, _ in rows}, "git": git_state()}
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    # The README's table comes from here: committed with the commit it describes (repo-relative paths only).
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (DOCS / "results.md").write_text("# `make demo` results\n\nWritten by `pipelines/demo.py` at commit "
                                     f"{results['git']['commit']} (tree {'dirty' if results['git']['dirty'] else 'clean'})."
                                     "\n\n```\n" + "\n".join(lines) + "\n```\n")
    print(f"\nresults: {(DOCS / 'results.md').relative_to(REPO)}")


if __name__ == "__main__":
    main()
