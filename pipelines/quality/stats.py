"""Statistics over seeds: mean ± std, per-epoch curves, and seed-paired differences with their SE."""

from __future__ import annotations

import math
import statistics


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(runs: list[dict]) -> dict:
    """Mean ± std over a variant's seeds: final mAP/NDS, the mAP/NDS curve and per-class AP. Seconds
    are not here: runs of one variant may come from different machines (machines.py groups them)."""
    curves: dict[int, list[tuple[float, float]]] = {}
    for r in runs:
        for epoch, h in enumerate(r["history"], start=1):  # one validation per epoch
            curves.setdefault(epoch, []).append((h["mAP"], h["NDS"]))
    classes = sorted({c for r in runs for c in r.get("class_ap", {})})
    return {
        "n": len(runs),
        "mAP": mean_std([r["final"]["mAP"] for r in runs]),
        "NDS": mean_std([r["final"]["NDS"] for r in runs]),
        "curve": {e: {"mAP": mean_std([m for m, _ in v]), "NDS": mean_std([n for _, n in v])}
                  for e, v in sorted(curves.items())},
        "class_ap": {c: mean_std([r["class_ap"][c] for r in runs if c in r.get("class_ap", {})]) for c in classes},
    }


def compare(a: list[dict], b: list[dict], key: str = "mAP") -> dict:
    """b - a on the final `key`, over the seeds both finished.

    `se` is the standard error of the seed-paired differences (stdev / sqrt(n)): the seeds share
    the data order and initialisation, so pairing removes their common part of the noise.
    `se_unpaired` is the two-sample SE, kept for comparison with earlier reports.
    """
    common = sorted({r["seed"] for r in a} & {r["seed"] for r in b})
    xa = [next(r for r in a if r["seed"] == s)["final"][key] for s in common]
    xb = [next(r for r in b if r["seed"] == s)["final"][key] for s in common]
    ma, sa = mean_std(xa)
    mb, sb = mean_std(xb)
    paired = [y - x for x, y in zip(xa, xb, strict=True)]
    se_unpaired = math.sqrt((sa**2 / len(xa) if len(xa) > 1 else 0) + (sb**2 / len(xb) if len(xb) > 1 else 0))
    se = statistics.stdev(paired) / math.sqrt(len(paired)) if len(paired) > 1 else 0.0
    return {"delta": mb - ma, "se": se, "se_unpaired": se_unpaired, "paired": paired,
            "wins": sum(d > 0 for d in paired), "n": len(paired)}


def verdict(c: dict) -> str:
    """'beats' / 'worse' / 'within noise' at twice the paired SE; 'one seed' without an error bar."""
    if c["n"] < 2 or c["se"] == 0:
        return "one seed: no error bar" if c["n"] < 2 else "no spread"
    if c["delta"] > 2 * c["se"]:
        return "beats it beyond 2 SE"
    if c["delta"] < -2 * c["se"]:
        return "worse beyond 2 SE"
    return "within 2 SE (no difference shown)"


def diff_text(c: dict, key: str = "mAP") -> str:
    se = f" ± {c['se']:.4f} (paired SE)" if c["se"] > 0 else ""
    return f"Δ{key} = {c['delta']:+.4f}{se}, {c['wins']} of {c['n']} seed-paired wins"


def fmt_ms(pair: tuple[float, float], digits: int = 4) -> str:
    m, s = pair
    return "-" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"
