"""`make demo`: the whole bevcache job end to end on synthetic nuScenes-format data, on CPU.

synth data -> train the tiny teacher -> extract its pts_neck to a Zarr store -> train the tiny
student plainly and with cached CRD (same seed, schedule and data) -> a table of mAP/NDS and time.
Sizes are small so it finishes in about ten minutes on 2 cores; pipelines/quality is the real test.
Outputs: data/synthetic-nus/, work_dirs/demo/ (logs, checkpoints, features.zarr, results.{md,json});
`--update-docs` (`make demo-docs`) also refreshes the committed docs/demo/results.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os

from common import REPO, bevcache, final_metrics, git_state

TRAIN = int(os.environ.get("DEMO_TRAIN_SAMPLES", 200))
VAL = int(os.environ.get("DEMO_VAL_SAMPLES", 50))
TEACHER_EPOCHS = int(os.environ.get("DEMO_TEACHER_EPOCHS", 4))
STUDENT_EPOCHS = int(os.environ.get("DEMO_STUDENT_EPOCHS", 3))
DATA = REPO / "data" / "synthetic-nus"
OUT = REPO / "work_dirs" / "demo"
DOCS = REPO / "docs" / "demo"


def epochs(max_epochs: int) -> list[str]:
    """Train for max_epochs, one validation at the end (bevcache.schedule rescales the cosine schedule)."""
    return ["--max-epochs", str(max_epochs), "--val-interval", str(max_epochs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update-docs", action="store_true",
                        help="Also rewrite docs/demo/results.{md,json} (the README's table; `make demo-docs`). "
                             "Without it the demo writes under work_dirs/demo only, so a user's tree stays clean.")
    args = parser.parse_args()
    state = git_state()  # the commit the run starts at (others may commit while it runs)
    OUT.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    if not (DATA / "nuscenes_infos_val.pkl").is_file():
        times["synth"] = bevcache("synth", str(DATA), "--samples", str(TRAIN), "--val-samples", str(VAL), "--seed", "0")
    print(f"[demo 1/4] train the teacher ({TEACHER_EPOCHS} epochs); log: {OUT / 'teacher.log'}", flush=True)
    times["teacher"] = bevcache("train", "--student", "configs/tiny_teacher.py", "--plain", "--work-dir", str(OUT / "teacher"),
                                "--data-root", str(DATA), *epochs(TEACHER_EPOCHS), log_file=OUT / "teacher.log")
    teacher_ckpt = (OUT / "teacher" / "last_checkpoint").read_text().strip()
    print("[demo 2/4] extract the teacher's pts_neck once", flush=True)
    times["extract"] = bevcache("extract", "--config", "configs/tiny_teacher.py", "--checkpoint", teacher_ckpt,
                                "--out", str(OUT / "features.zarr"), "--data-root", str(DATA), "--overwrite")
    bevcache("info", str(OUT / "features.zarr"))
    student_opts = ["--data-root", str(DATA), *epochs(STUDENT_EPOCHS)]
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
               "metrics": {name: m for name, m, _ in rows},
               "git": {"commit": state["commit"], "dirty": not state["clean"]}}
    report = ("# `make demo` results\n\nWritten by `pipelines/demo.py` at commit "
              f"{results['git']['commit']} (tree {'dirty' if results['git']['dirty'] else 'clean'})."
              "\n\n```\n" + "\n".join(lines) + "\n```\n")
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (OUT / "results.md").write_text(report)
    written = OUT / "results.md"
    if args.update_docs:  # the README's table comes from here, committed with the commit it describes
        DOCS.mkdir(parents=True, exist_ok=True)
        (DOCS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (DOCS / "results.md").write_text(report)
        written = DOCS / "results.md"
    print(f"\nresults: {written.relative_to(REPO)}")


if __name__ == "__main__":
    main()
