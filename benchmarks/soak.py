"""Soak test of crash safety: kill -9 `bevcache extract` at random moments, resume, repeat.

Each cycle starts (or resumes) an extraction and SIGKILLs it after a random delay; when a cycle
finishes by itself the store is compared row by row with an uninterrupted reference extraction.
Prints cycles survived, kills delivered and mismatching rows (must be 0). Not part of the suite.

    .venv/bin/python benchmarks/soak.py --samples 300 --rounds 3      # a few minutes on 2 cores
    .venv/bin/python benchmarks/soak.py --quick                        # smoke test
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
from common import (
    PY,
    REPO,
    machine,
    parser,
    random_teacher_checkpoint,
    synth_data,
    table,
    write_result,
)

TEACHER = str(REPO / "configs" / "tiny_teacher.py")


def extract_cmd(data_root: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [PY, "-m", "bevcache.cli", "extract", "--config", TEACHER, "--checkpoint", str(ckpt), "--data-root",
            str(data_root), "--out", str(out), "--batch-size", "2", "--num-workers", "0", "--chunk-rows", "8",
            "--dtype", "float32", *extra]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3, help="Complete kill/resume sequences.")
    p.add_argument("--min-delay", type=float, default=2.0, help="Shortest wait before a kill (s).")
    p.add_argument("--max-delay", type=float, default=16.0,
                   help="Longest wait before a kill (s); start-up alone takes ~8 s on 2 cores.")
    p.add_argument("--max-kills", type=int, default=12, help="Kills per round before letting it finish.")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.samples, args.rounds, args.max_kills = 24, 1, 2
    rng = random.Random(args.seed)
    work = Path(args.work) / "soak"
    work.mkdir(parents=True, exist_ok=True)
    data_root = synth_data(Path(args.work), args.samples, 4)
    ckpt = random_teacher_checkpoint(Path(args.work))
    from bevcache.store import open_store

    reference = work / "reference.zarr"
    if reference.exists():
        shutil.rmtree(reference)
    subprocess.run(extract_cmd(data_root, ckpt, reference), cwd=REPO, check=True, capture_output=True)
    ref = {name: open_store(str(reference)).read_table(name).numpy() for name in ("pts_neck",)}

    rows = []
    for round_index in range(args.rounds):
        out = work / f"round{round_index}.zarr"
        if out.exists():
            shutil.rmtree(out)
        kills = cycles = recreated = 0
        overwrite_next = False
        while True:
            cycles += 1
            extra = ("--overwrite",) if overwrite_next else ("--resume",) if out.exists() else ()
            overwrite_next = False
            log = work / "cycle.log"  # a file, not a pipe: a full pipe would stall the child
            with open(log, "w") as fh:
                proc = subprocess.Popen(extract_cmd(data_root, ckpt, out, *extra), cwd=REPO,
                                        stdout=subprocess.DEVNULL, stderr=fh)
            try:
                proc.wait(timeout=None if kills >= args.max_kills else rng.uniform(args.min_delay, args.max_delay))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
            err = log.read_text()
            if proc.returncode != 0 and "--overwrite" in err and "creation was interrupted" in err:
                overwrite_next, recreated = True, recreated + 1  # killed while creating: nothing to keep
                continue
            if proc.returncode != 0:
                raise SystemExit(f"extract failed after {kills} kills: {err[-2000:]}")
            break
        store = open_store(str(out))
        problems = store.verify()
        table_now = store.read_table("pts_neck").numpy()
        mismatching = int((~np.all(table_now == ref["pts_neck"], axis=1)).sum())
        rows.append([round_index, cycles, kills, recreated, len(problems), mismatching])
        print(f"[soak] round {round_index}: {cycles} cycles, {kills} kills, verify problems {len(problems)}, "
              f"mismatching rows {mismatching}", flush=True)
        time.sleep(0.1)
    print()
    print(table(["round", "cycles", "kill -9", "re-created (killed during creation)", "verify problems",
                 "mismatching rows"], rows))
    total_bad = sum(r[4] + r[5] for r in rows)
    write_result("soak", args, {"samples": args.samples, "rounds": rows, "mismatching_rows_total": total_bad},
                 machine())
    if total_bad:
        raise SystemExit(f"soak FAILED: {total_bad} bad rows/problems")


if __name__ == "__main__":
    main()
