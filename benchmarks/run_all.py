"""`make bench`: run every benchmark in turn (each in its own process) and collect their tables.

    .venv/bin/python benchmarks/run_all.py                    # full: alone on the machine, ~15 min on 2 cores
    .venv/bin/python benchmarks/run_all.py --quick            # smoke test of every script
    .venv/bin/python benchmarks/run_all.py --only store,crd   # a subset

Each script writes benchmarks/results/<name>.json (quick runs: work_dirs/bench/quick/); the
tables they print are gathered into benchmarks/results/summary.md (quick: work_dirs/bench/quick/).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BENCHMARKS = ["train_step", "extract", "store", "crd", "views", "fidelity", "spatial", "startup", "fused"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="Smoke-test every script with tiny sizes.")
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"Comma-separated subset of {BENCHMARKS}.")
    p.add_argument("--keep-going", action="store_true", help="Run the rest when one fails.")
    p.add_argument("--allow-dirty", action="store_true",
                   help="Measure a tree with uncommitted changes (results then describe no commit).")
    args = p.parse_args()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":(exclude)benchmarks/results"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    if dirty and not args.quick and not args.allow_dirty:
        sys.exit("the tree has uncommitted changes: committed results must describe a commit. Commit (or stash) "
                 "first, or pass --allow-dirty for a throw-away run.\n" + dirty)
    chosen = [b for b in args.only.split(",") if b]
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        sys.exit(f"unknown benchmarks {sorted(unknown)}; known: {BENCHMARKS}")
    sections, failed = [], []
    for name in chosen:
        cmd = [sys.executable, str(HERE / f"bench_{name}.py")] + (["--quick"] if args.quick else [])
        print(f"\n=== bench_{name}.py {'--quick' if args.quick else ''}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        proc.wait()
        seconds = time.perf_counter() - t0
        if proc.returncode:
            failed.append(name)
            print(f"=== bench_{name}.py FAILED (exit {proc.returncode}) after {seconds:.0f} s", flush=True)
            if not args.keep_going:
                break
            continue
        # The report: from the first table heading on, without the library's warnings.
        first = next((i for i, line in enumerate(lines) if line.startswith("### ")), len(lines))
        body = [line for line in lines[first:] if "Warning" not in line and not line.startswith(("  from ", "[bench]", "USDT:"))]
        sections.append(f"## bench_{name}.py ({seconds:.0f} s)\n\n" + "".join(body).strip() + "\n")
        print(f"=== bench_{name}.py done in {seconds:.0f} s", flush=True)
    out = (REPO / "work_dirs" / "bench" / "quick" if args.quick else HERE / "results") / "summary.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    text = ("# bevcache benchmarks" + (" (quick smoke run: not measurements)" if args.quick else "")
            + f"\n\nWritten by `benchmarks/run_all.py` at commit {commit} (tree "
            + ("with uncommitted changes" if dirty else "clean") + "); each JSON in this folder records its own commit."
            + "\n\n" + "\n".join(sections))
    out.write_text(text.replace(str(REPO) + "/", "").replace(str(REPO), "."))  # repo-relative paths only
    print(f"\nsummary: {out}")
    if failed:
        sys.exit(f"failed: {failed}")


if __name__ == "__main__":
    main()
