"""`make demo-fused`: does a camera-fused teacher help a LiDAR student? (issue 17), on CPU.

synth data with cameras (bicycles and motorcycles: one LiDAR geometry, told apart only by colour,
docs/synth_cameras.md) -> train the fused camera+LiDAR teacher and a LiDAR-only teacher with the same
LiDAR branch -> extract the fused teacher's pts_neck -> train the LiDAR student plainly and with cached
CRD (same seed and schedule) -> a table of mAP, NDS, the two cue classes' AP and training time.
The teachers' gap on the cue classes measures what the cameras add; the students show how much of it
distillation carries into a LiDAR-only model. Sizes are small (about 15 min on 2 cores): a demo, not
evidence. Resumable: a step whose output exists (same sizes) is skipped, so rerunning continues.
Outputs: data/synthetic-nus-cam/, work_dirs/demo_fused/ (logs, checkpoints, features.zarr,
results.{md,json}); `--update-docs` also writes docs/demo_fused/results.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

from common import REPO, bevcache, class_ap, final_metrics, git_state

TRAIN = int(os.environ.get("DEMO_FUSED_TRAIN_SAMPLES", 48))
VAL = int(os.environ.get("DEMO_FUSED_VAL_SAMPLES", 16))
TEACHER_EPOCHS = int(os.environ.get("DEMO_FUSED_TEACHER_EPOCHS", 2))
STUDENT_EPOCHS = int(os.environ.get("DEMO_FUSED_STUDENT_EPOCHS", 2))
DATA = Path(os.environ.get("DEMO_FUSED_DATA", REPO / "data" / "synthetic-nus-cam")).resolve()
OUT = Path(os.environ.get("DEMO_FUSED_OUT", REPO / "work_dirs" / "demo_fused")).resolve()
DOCS = REPO / "docs" / "demo_fused"
CUE = ("bicycle", "motorcycle")  # LiDAR-identical in a --cameras root; only the paint differs
FUSED, LIDAR, STUDENT = "configs/tiny_fused_teacher.py", "configs/tiny_voxel_teacher.py", "configs/tiny_voxel_student.py"


def rel(path: Path) -> str:
    """Repo-relative where possible: what is written to docs/ must not name this machine's paths."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def epochs(max_epochs: int) -> list[str]:
    """Train for max_epochs, one validation at the end (bevcache.schedule rescales the cosine schedule)."""
    return ["--max-epochs", str(max_epochs), "--val-interval", str(max_epochs)]


def check_data() -> None:
    """An existing data root is reused only if it is a --cameras root of the requested sizes: a
    LiDAR-only root has no cue, and other sizes would make the table describe something else."""
    counts, cameras = {}, True
    for split in ("train", "val"):
        with open(DATA / f"nuscenes_infos_{split}.pkl", "rb") as fh:
            infos = pickle.load(fh)
        counts[split] = len(infos["data_list"])
        cameras &= all(info.get("images") for info in infos["data_list"])
    if counts != {"train": TRAIN, "val": VAL} or not cameras:
        sys.exit(f"{rel(DATA)} holds {counts['train']} train / {counts['val']} val samples"
                 f"{'' if cameras else ' without cameras'}; this demo wants {TRAIN} / {VAL} with cameras. "
                 "Delete it or point DEMO_FUSED_DATA at another directory.")


class Steps:
    """OUT/steps.json: each finished step's arguments and seconds. A step reruns when its arguments
    changed, its output is gone or a step it reads (`after`) ran again; otherwise its recorded time
    is reused (so is the table)."""

    def __init__(self, path: Path):
        self.path = path
        self.done = json.loads(path.read_text()) if path.is_file() else {}
        self.fresh: set[str] = set()

    def finished(self, name: str, args: list[str], output: Path, after: tuple[str, ...] = ()) -> bool:
        record = self.done.get(name)
        return bool(record and record["args"] == args and output.exists() and not self.fresh & set(after))

    def run(self, name: str, args: list[str], output: Path, after: tuple[str, ...] = (), **kw) -> float:
        record = self.done.get(name)
        if self.finished(name, args, output, after):
            print(f"   (done before: {rel(output)}, {record['seconds']:.0f} s; skipped)", flush=True)
            return record["seconds"]
        self.done.pop(name, None)
        self.path.write_text(json.dumps(self.done, indent=2) + "\n")
        seconds = bevcache(*args, **kw)
        self.fresh.add(name)
        self.done[name] = {"args": args, "seconds": seconds}
        self.path.write_text(json.dumps(self.done, indent=2) + "\n")
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Sizes: DEMO_FUSED_TRAIN_SAMPLES, DEMO_FUSED_VAL_SAMPLES, "
                                            "DEMO_FUSED_TEACHER_EPOCHS, DEMO_FUSED_STUDENT_EPOCHS; places: "
                                            "DEMO_FUSED_DATA, DEMO_FUSED_OUT.")
    parser.add_argument("--update-docs", action="store_true",
                        help="Also write docs/demo_fused/results.{md,json} (committed). Without it the demo "
                             "writes under work_dirs/demo_fused only, so a user's tree stays clean.")
    args = parser.parse_args()
    state = git_state()  # the commit the run starts at (others may commit while it runs)
    OUT.mkdir(parents=True, exist_ok=True)
    steps = Steps(OUT / "steps.json")
    times: dict[str, float] = {}
    if (DATA / "nuscenes_infos_val.pkl").is_file():
        check_data()
    else:
        print(f"[demo-fused 0/5] synthesise {TRAIN} + {VAL} samples with cameras in {rel(DATA)}", flush=True)
        times["synth"] = bevcache("synth", str(DATA), "--cameras", "--samples", str(TRAIN),
                                  "--val-samples", str(VAL), "--seed", "0")
        steps.fresh.add("synth")  # new data: every step reruns
    data = ["--data-root", str(DATA)]

    def train(name: str, config: str, *extra: str, n_epochs: int, after: tuple[str, ...] = ()) -> float:
        work_dir = OUT / name
        argv = ["train", "--student", config, *extra, "--work-dir", str(work_dir), *data, *epochs(n_epochs)]
        done = work_dir / "last_checkpoint"
        if not steps.finished(name, argv, done, after):
            shutil.rmtree(work_dir, ignore_errors=True)  # an interrupted or stale run: its metrics must not count
        return steps.run(name, argv, done, ("synth", *after), log_file=OUT / f"{name}.log")

    print(f"[demo-fused 1/5] train the fused camera+LiDAR teacher ({TEACHER_EPOCHS} epochs); "
          f"log: {rel(OUT / 'teacher_fused.log')}", flush=True)
    times["teacher fused"] = train("teacher_fused", FUSED, "--plain", n_epochs=TEACHER_EPOCHS)
    print(f"[demo-fused 2/5] train the LiDAR-only teacher, same LiDAR branch ({TEACHER_EPOCHS} epochs)", flush=True)
    times["teacher LiDAR"] = train("teacher_lidar", LIDAR, "--plain", n_epochs=TEACHER_EPOCHS)

    print("[demo-fused 3/5] extract the fused teacher's pts_neck once", flush=True)
    store = OUT / "features.zarr"
    ckpt = (OUT / "teacher_fused" / "last_checkpoint").read_text().strip()
    times["extract"] = steps.run("extract", ["extract", "--config", FUSED, "--checkpoint", ckpt, "--out", str(store),
                                             *data, "--overwrite"], store, after=("synth", "teacher_fused"))
    bevcache("info", str(store))

    print(f"[demo-fused 4/5] train the LiDAR student plainly ({STUDENT_EPOCHS} epochs)", flush=True)
    times["student plain"] = train("student_plain", STUDENT, "--plain", n_epochs=STUDENT_EPOCHS)
    print("[demo-fused 5/5] train the LiDAR student with CRD against the cached fused teacher", flush=True)
    times["student + CRD"] = train("student_crd", STUDENT, "--cache", str(store), n_epochs=STUDENT_EPOCHS,
                                    after=("extract",))

    rows = [
        ("fused teacher (cam+LiDAR)", "teacher_fused", times["teacher fused"]),
        ("LiDAR-only teacher", "teacher_lidar", times["teacher LiDAR"]),
        ("LiDAR student plain", "student_plain", times["student plain"]),
        ("LiDAR student + fused CRD", "student_crd", times["student + CRD"]),
    ]
    metrics = {name: {**final_metrics(OUT / d), **{f"{c}_AP": ap for c, ap in class_ap(OUT / d, CUE).items()},
                      "train_s": sec}
               for name, d, sec in rows}
    gap = {c: metrics[rows[0][0]][f"{c}_AP"] - metrics[rows[1][0]][f"{c}_AP"] for c in CUE}
    lines = [f"bevcache demo-fused: {TRAIN} train / {VAL} val synthetic samples with cameras, teachers "
             f"{TEACHER_EPOCHS} epochs, students {STUDENT_EPOCHS}, extraction {times['extract']:.0f} s", "",
             f"| {'model':<26} | {'mAP':>6} | {'NDS':>6} | {'bicycle AP':>10} | {'motorcycle AP':>13} | {'train s':>7} |",
             f"|{'-' * 28}|{'-' * 8}|{'-' * 8}|{'-' * 12}|{'-' * 15}|{'-' * 9}|"]
    lines += [f"| {name:<26} | {m['mAP']:6.3f} | {m['NDS']:6.3f} | {m['bicycle_AP']:10.3f} | "
              f"{m['motorcycle_AP']:13.3f} | {m['train_s']:7.0f} |" for name, m in metrics.items()]
    lines += ["", "cue gap, fused - LiDAR-only teacher (AP): " + ", ".join(f"{c} {g:+.3f}" for c, g in gap.items())]
    print("\n" + "\n".join(lines))
    results = {"samples": {"train": TRAIN, "val": VAL}, "epochs": {"teacher": TEACHER_EPOCHS, "student": STUDENT_EPOCHS},
               "data_root": rel(DATA), "configs": {"fused teacher": FUSED, "LiDAR teacher": LIDAR, "student": STUDENT},
               "cue_classes": list(CUE), "seconds": times, "metrics": metrics, "cue_gap_teachers": gap,
               "git": {"commit": state["commit"], "dirty": not state["clean"]}}
    report = ("# `make demo-fused` results\n\nWritten by `pipelines/demo_fused.py` at commit "
              f"{results['git']['commit']} (tree {'dirty' if results['git']['dirty'] else 'clean'}). AP of a class: "
              "the mean of its nuScenes AP over the 0.5/1/2/4 m thresholds. Bicycle and motorcycle are identical "
              "to the LiDAR and differ only in colour (docs/synth_cameras.md).\n\n```\n" + "\n".join(lines) + "\n```\n")
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (OUT / "results.md").write_text(report)
    written = OUT / "results.md"
    if args.update_docs:
        DOCS.mkdir(parents=True, exist_ok=True)
        (DOCS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (DOCS / "results.md").write_text(report)
        written = DOCS / "results.md"
    print(f"\nresults: {rel(written)}")


if __name__ == "__main__":
    main()
