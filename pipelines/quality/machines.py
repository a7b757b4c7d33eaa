"""The machine ledger, `<records>/machines.json`: which machine wrote which record.

The matrix runs in pieces over several sessions, each on whatever machine it gets, and a 2-core
machine can train ~1.9x faster than another. Seconds are therefore compared only within one
machine: the report groups every run's seconds per epoch by the machine the ledger names for it.
A ledger entry: {"cpu": benchmarks/common.py machine() facts, "wrote": ["runs/plain-seed1",
"tune/*", ...] (record ids: paths under the records dir without .json, shell patterns allowed),
"store_reextracted_seconds": {"stores/T1-views20-spatial32": 245}, ...}.
"""

from __future__ import annotations

import fnmatch
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

LEDGER = "machines.json"
UNLISTED = "unlisted"  # a record no ledger entry names


def load_ledger(records: Path) -> list[dict]:
    """The ledger's machine entries, in the order they were added (empty when there is none)."""
    path = Path(records) / LEDGER
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text())["machines"])
    except (ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"[quality] {path} is not a machine ledger ({err}): it needs "
                         '{"machines": [{"cpu": ..., "wrote": [record ids]}, ...]}; fix or remove it') from err


def machine_of(ledger: list[dict], record_id: str) -> str:
    """'machine N' (1-based, ledger order) for the entry whose `wrote` names `record_id`."""
    for number, entry in enumerate(ledger, start=1):
        if any(fnmatch.fnmatchcase(record_id, pattern) for pattern in entry.get("wrote", ())):
            return f"machine {number}"
    return UNLISTED


def describe(ledger: list[dict], machine: str) -> str:
    """'machine 2 (AMD EPYC, 2 cores)': the name with the CPU the ledger recorded for it."""
    if machine == UNLISTED:
        return "a machine the ledger does not list"
    cpu = ledger[int(machine.split()[1]) - 1].get("cpu")
    if isinstance(cpu, dict):
        return f"{machine} ({cpu.get('cpu_model', '?')}, {cpu.get('cpu_count', '?')} cores)"
    return f"{machine} ({cpu})" if cpu else machine


def reextracted_seconds(ledger: list[dict], record_id: str) -> list[tuple[str, float]]:
    """(machine, seconds) for each machine that extracted store `record_id` again."""
    return [(f"machine {n}", float(e["store_reextracted_seconds"][record_id]))
            for n, e in enumerate(ledger, start=1) if record_id in e.get("store_reextracted_seconds", {})]


def by_machine(ledger: list[dict], runs: list[dict], seconds: Callable[[dict], float | None]) -> dict[str, list[float]]:
    """`seconds(run)` of each run that has it, grouped by the machine that ran it."""
    out: dict[str, list[float]] = {}
    for r in runs:
        value = seconds(r)
        if value is not None:
            out.setdefault(machine_of(ledger, r.get("record_id", "")), []).append(value)
    return dict(sorted(out.items()))


def seconds_per_epoch_by_machine(ledger: list[dict], runs: list[dict]) -> dict[str, list[float]]:
    """Each run's mean training seconds per epoch (validation excluded), grouped by machine."""
    return by_machine(ledger, runs, lambda r: statistics.fmean(r["train_seconds_per_epoch"].values())
                      if r.get("train_seconds_per_epoch") else None)


def wall_seconds_by_machine(ledger: list[dict], runs: list[dict]) -> dict[str, list[float]]:
    """Each run's wall clock, grouped by machine."""
    return by_machine(ledger, runs, lambda r: r.get("seconds"))


def relative_cost(ledger: list[dict], base: list[dict], other: list[dict]) -> dict[str, tuple[float, float, float]]:
    """Per machine that ran both: (base s/epoch, other s/epoch, other / base). Never across machines."""
    b = seconds_per_epoch_by_machine(ledger, base)
    o = seconds_per_epoch_by_machine(ledger, other)
    out = {}
    for machine in sorted(set(b) & set(o)):
        mb, mo = statistics.fmean(b[machine]), statistics.fmean(o[machine])
        out[machine] = (mb, mo, mo / mb if mb > 0 else math.nan)
    return out
