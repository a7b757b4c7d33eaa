"""A short plain-student run on this machine (`--piece reference`): the base for cost ratios there.

Each session gets whatever 2-core machine it is lent, and two such machines have differed ~1.9x,
so the report divides a variant's seconds per epoch only by plain runs of the same machine. A
machine that runs T2 or T3 pieces but none of the three plain seeds has no such base; this run
gives it one: the plain augmented student's own settings (seed 0) for a few epochs, no validation,
its training seconds per epoch recorded as `references/plain-<UTC time>` under --records. The
session lists that record in its machine's `wrote` in the ledger, like every other record.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

from common import bevcache
from options import iters_per_epoch
from steps import epoch_times, rel, schedule_options, student_args, tree_state

REFERENCES = "references"


def run_reference(args: argparse.Namespace) -> dict:
    """Train the plain student `args.reference_epochs` epochs here; write and return its record."""
    epochs = args.reference_epochs
    work_dir = args.out / REFERENCES / "plain"
    state = tree_state(args)
    shutil.rmtree(work_dir, ignore_errors=True)
    extra = student_args(args, "plain-reference", "plain", None, None, None)
    log = args.out / "logs" / "reference-plain.log"
    print(f"[quality] plain reference, {epochs} epochs -> {rel(work_dir)} (log {rel(log)})", flush=True)
    # val_interval past the last epoch: no validation, so the seconds are the training steps only.
    seconds = bevcache("train", *extra, *schedule_options(args, epochs, epochs + 1, 0, extra[1]),
                       "--work-dir", str(work_dir), "--data-root", str(args.data), log_file=log)
    per_epoch = epoch_times(work_dir, iters_per_epoch(args))
    if len(per_epoch) < epochs:
        raise SystemExit(f"[quality] the plain reference logged {len(per_epoch)} of {epochs} epochs; see {log}")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    record = {"what": f"plain augmented student, seed 0, {epochs} epochs, no validation (a machine's cost base)",
              "seconds": seconds, "train_seconds_per_epoch": per_epoch, "git": state,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = args.records / REFERENCES / f"plain-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"[quality] plain reference: {sum(per_epoch.values()) / len(per_epoch):.1f} s per epoch -> {rel(path)}; "
          f"add `{REFERENCES}/{path.stem}` to this machine's `wrote` in {rel(args.records / 'machines.json')}",
          flush=True)
    return record


def load_references(args: argparse.Namespace) -> list[dict]:
    """Every reference record under --records, with its record id."""
    folder = args.records / REFERENCES
    return [{**json.loads(p.read_text()), "record_id": f"{REFERENCES}/{p.stem}"}
            for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
