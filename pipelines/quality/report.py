"""docs/quality/report.md (+ results.json, map_over_epochs.png, time_per_epoch.png), per teacher:
does a cached variant beat plain augmented beyond 2 SE, is cached within noise of online, what each
costs per epoch; when nothing wins, the ablations that say why."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from pathlib import Path

from common import git_state
from machines import (
    UNLISTED,
    describe,
    load_ledger,
    machine_of,
    reextracted_seconds,
    relative_cost,
    seconds_per_epoch_by_machine,
    wall_seconds_by_machine,
)
from matrix import CACHED, CLASSES, CUE, KIND_LABELS, STUDENT_CFG, TEACHERS
from reference import load_references
from stats import aggregate, compare, diff_text, fmt_ms, mean_std, verdict
from steps import rel

PLATEAU = 0.01  # mean mAP gain over the last 3 epochs below this: no longer rising
SIDE_BY_SIDE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "train_step.json"


def provenance(records: list[dict]) -> tuple[list[str], bool]:
    """Commits the records were taken at; (lines, clean): a report of mixed commits or a dirty tree
    is flagged at its top."""
    commits: dict[str, list[str]] = {}
    dirty = []
    for r in records:
        g = r.get("git") or {"short": "unrecorded", "clean": False}
        what = r.get("what") or r.get("store") or "?"
        commits.setdefault(g.get("code_short", g["short"]), []).append(what)  # HEAD moves as records land
        if not g["clean"]:
            dirty.append(what)
    clean = len(commits) == 1 and not dirty and "unrecorded" not in commits
    if clean:
        return [f"Every step ran the code of commit `{next(iter(commits))}` on a clean tree."], True
    lines = ["**WARNING: NOT ONE CLEAN MEASUREMENT.** "
             + (f"The runs span {len(commits)} commits: "
                + "; ".join(f"`{c}` ({len(w)} steps)" for c, w in commits.items()) + ". " if len(commits) > 1 else "")
             + (f"{len(dirty)} step(s) ran on a tree with local changes: {dirty[:6]}{' ...' if len(dirty) > 6 else ''}."
                if dirty else "")]
    return lines, False


def curve_rise(agg: dict) -> float:
    curve = agg["curve"]
    epochs = sorted(curve)
    if len(epochs) < 2:
        return float("nan")
    back = epochs[max(0, len(epochs) - 4)]
    return curve[epochs[-1]]["mAP"][0] - curve[back]["mAP"][0]


def seconds_text(groups: dict[str, list[float]], unit: str = "") -> str:
    """Seconds grouped by machine (machines.py), mean ± std per machine: never pooled across machines."""
    return "; ".join(f"{fmt_ms(mean_std(xs), 0)}{unit} ({m})" for m, xs in groups.items()) or "-"


@functools.cache
def side_by_side(path: Path = SIDE_BY_SIDE) -> dict:
    """The per-step ratios bench_train_step.py measured in one process (read once per report)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def quality_side_by_side_lines(teacher: str) -> list[str]:
    """bench_train_step.py runs on this teacher's store with the quality student
    (`benchmarks/results/train_step_quality_<teacher>*.json`): the per-epoch seconds of the records
    are taken hours apart, these interleave the variants in one process."""
    md = []
    for path in sorted(SIDE_BY_SIDE.parent.glob(f"train_step_quality_{teacher}*.json")):
        bench = side_by_side(path)
        ratios = {k: v for k, v in bench.get("ratios", {}).items() if v}
        if not ratios:
            continue
        bargs, mach = bench.get("args", {}), bench.get("machine", {})
        what = " ".join([Path(str(bargs.get("student", "?"))).name, *bargs.get("distill", [])])
        md.append(f"- Side by side on {teacher}'s store (`{path.name}`: {what}, {mach.get('cpu_model', '?')}, "
                  f"commit {mach.get('git', {}).get('commit', '?')[:7]}): "
                  + ", ".join(f"{k} {v['of_medians']:.3f} (per repetition {v['min']:.3f}..{v['max']:.3f})"
                              for k, v in ratios.items()) + " per training step.")
    return md


def cost_lines(ledger: list[dict], runs: dict[str, list[dict]], names: dict[str, str], trec: dict,
               srec: dict | None, references: list[dict] = (), teacher: str | None = None) -> list[str]:
    """Each variant's seconds per epoch against plain augmented run on the same machine, or, on a
    machine that ran no plain seed, against its plain reference run (`--piece reference`)."""
    md = ["- Training seconds per epoch (validation excluded), each against plain augmented on the same "
          "machine (two 2-core machines differ up to ~1.9x, so no ratio is taken across machines; "
          "`machines.json` in the records says which machine ran what; a machine that ran no plain seed "
          "is compared with its own short plain reference run, `--piece reference`):"]
    for kind, variant in names.items():
        if kind == "plain" or not runs.get(variant):
            continue
        ran_on = seconds_per_epoch_by_machine(ledger, runs[variant])
        against_plain = relative_cost(ledger, runs.get("plain", []), runs[variant])
        against_reference = {m: v for m, v in relative_cost(ledger, list(references), runs[variant]).items()
                             if m not in against_plain}
        parts = [f"{mo:.0f} s vs {mb:.0f} s = **{ratio:.2f}x** on {describe(ledger, m)}"
                 for m, (mb, mo, ratio) in against_plain.items()]
        parts += [f"{mo:.0f} s vs {mb:.0f} s = **{ratio:.2f}x** on {describe(ledger, m)} (vs its plain reference run)"
                  for m, (mb, mo, ratio) in against_reference.items()]
        if parts:
            md.append(f"  - {KIND_LABELS[kind]}: " + "; ".join(parts) + ".")
        if not parts or set(ran_on) - set(against_plain) - set(against_reference):
            bare = ", ".join(m for m in ran_on if m not in against_plain and m not in against_reference)
            md.append(f"  - {KIND_LABELS[kind]}: no plain run on its machine ({bare}): no ratio.")
    bench = side_by_side()
    ratios = {k: v["of_medians"] for k, v in bench.get("ratios", {}).items()}
    if ratios:
        md.append(f"- Side by side in one process (`benchmarks/bench_train_step.py`, tiny pair, "
                  f"{bench['machine'].get('cpu_model', '?')}, commit {bench['machine'].get('git', {}).get('commit', '?')[:7]}): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
                  + " per training step (spatial maps: `spatial_step.json`; the fused teacher: `fused.json`).")
    if teacher:
        md += quality_side_by_side_lines(teacher)
    if srec:
        again = reextracted_seconds(ledger, srec.get("record_id", ""))
        md.append(f"- One-off: the teacher ({trec['seconds']:.0f} s, {machine_of(ledger, trec.get('record_id', ''))}) "
                  f"and its extraction ({srec['seconds']:.0f} s, {machine_of(ledger, srec.get('record_id', ''))}"
                  + "".join(f"; {sec:.0f} s extracted again on {m}" for m, sec in again) + ").")
    return md


def teacher_section(args: argparse.Namespace, key: str, t: dict, runs: dict[str, list[dict]],
                    tuning: dict | None, ledger: list[dict], references: list[dict] = ()) -> tuple[list[str], dict]:
    """The table and the three answers for one teacher."""
    trec, srec = t.get("record"), t.get("store")
    names = {"plain": "plain", **{k: f"{key}-{k}" for k in (*CACHED, "online")}}
    agg = {k: aggregate(runs[v]) for k, v in names.items() if runs.get(v)}
    md = [f"## {TEACHERS[key].label}: `{TEACHERS[key].config}`", ""]
    if not trec:
        return md + ["Teacher not trained yet.", ""], {}
    mirror = next((r.get("mirror") for r in runs.get(names["online"], []) if r.get("mirror")), None)
    md += ["| model | seeds | mAP (final) | NDS | bicycle AP | motorcycle AP | mAP rise, last 3 epochs | "
           "train s/epoch | wall per run |", "|---|---|---|---|---|---|---|---|---|"]
    md.append(f"| teacher {key} | 1 | {trec['final']['mAP']:.4f} | {trec['final']['NDS']:.4f} | "
              f"{trec['class_ap']['bicycle']:.4f} | {trec['class_ap']['motorcycle']:.4f} | - | "
              f"{seconds_text(seconds_per_epoch_by_machine(ledger, [trec]))} | "
              f"{seconds_text(wall_seconds_by_machine(ledger, [trec]), ' s')} |")
    for kind, a in agg.items():
        label = KIND_LABELS[kind] + (f" (mirrors {mirror})" if kind == "online" and mirror else "")
        rise = curve_rise(a)
        rise_text = "-" if math.isnan(rise) else f"{rise:+.4f}" + (" (plateau)" if rise < PLATEAU else " **(still rising)**")
        md.append(f"| {label} | {a['n']} | {fmt_ms(a['mAP'])} | {fmt_ms(a['NDS'])} | "
                  f"{fmt_ms(a['class_ap'].get('bicycle', (math.nan, math.nan)))} | "
                  f"{fmt_ms(a['class_ap'].get('motorcycle', (math.nan, math.nan)))} | "
                  f"{rise_text} | {seconds_text(seconds_per_epoch_by_machine(ledger, runs[names[kind]]))} | "
                  f"{seconds_text(wall_seconds_by_machine(ledger, runs[names[kind]]), ' s')} |")
    if srec:
        md += ["", f"Store: {srec['views']} augmented views + the sample, pooled 512-d and {srec['spatial_grid']}x"
                   f"{srec['spatial_grid']} maps, extracted once in {srec['seconds']:.0f} s "
                   f"({srec['bytes_on_disk'] / 2**20:.0f} MiB)."]
    md += ["", "**Does a cached variant beat plain augmented beyond 2 SE?**"]
    answers: dict = {"teacher": {"mAP": trec["final"]["mAP"], "class_ap": trec["class_ap"]}}
    wins = []
    for kind in CACHED:
        if names[kind] in runs and runs[names[kind]] and runs.get("plain"):
            c = compare(runs["plain"], runs[names[kind]])
            answers[f"{kind}_vs_plain"] = c
            wins.append(verdict(c) == "beats it beyond 2 SE")
            md.append(f"- {KIND_LABELS[kind]} − plain: {diff_text(c)}: **{verdict(c)}**.")
    if runs.get(names["online"]) and runs.get("plain"):  # not the question, but a reader needs it beside the answer
        c = compare(runs["plain"], runs[names["online"]])
        answers["online_vs_plain"] = c
        md.append(f"- For comparison, {KIND_LABELS['online']} − plain: {diff_text(c)}: {verdict(c)}.")
    md += ["", "**Is cached within noise of online?**"]
    if mirror and runs.get(names["online"]) and runs.get(names[mirror]):
        c = compare(runs[names["online"]], runs[names[mirror]])
        answers["cached_vs_online"] = c
        ok = c["n"] > 1 and abs(c["delta"]) <= 2 * c["se"]
        md.append(f"- {KIND_LABELS[mirror]} − online: {diff_text(c)}: "
                  f"**{'yes, within 2 SE' if ok else verdict(c)}**.")
    else:
        md.append("- Online runs not finished.")
    md += ["", "**What does each cost per epoch?**", *cost_lines(ledger, runs, names, trec, srec, references, teacher=key)]
    if not any(wins):
        heading = "No cached variant wins: the ablations." if wins else "The ablations so far (no comparison finished yet)."
        md += ["", f"**{heading}**", ""] + ablations(args, key, trec, agg, tuning)
    answers["aggregate"] = agg
    answers["seconds_per_epoch_by_machine"] = {k: seconds_per_epoch_by_machine(ledger, runs[v])
                                               for k, v in names.items() if runs.get(v)}
    return md + [""], answers


def cue_text(trace: float) -> str:
    """How the cue classes differ in this data (`bevcache synth --cue-lidar-trace`)."""
    if not trace:
        return "bicycle and motorcycle differ only in colour, so a LiDAR-only model can only guess between them"
    return (f"bicycle and motorcycle differ plainly in colour and weakly in the LiDAR: their return intensities "
            f"differ by {trace:.0%} of the shared one, a trace a LiDAR model can learn to read")


def ablations(args: argparse.Namespace, key: str, trec: dict, agg: dict, tuning: dict | None) -> list[str]:
    md = [f"Teacher − student gap on the cue classes (AP; {cue_text(args.cue_lidar_trace)}):", ""]
    md += ["| model | " + " | ".join(CUE) + " |", "|---|" + "---|" * len(CUE)]
    md.append(f"| teacher {key} | " + " | ".join(f"{trec['class_ap'][c]:.4f}" for c in CUE) + " |")
    for kind, a in agg.items():
        md.append(f"| {KIND_LABELS[kind]} | " + " | ".join(fmt_ms(a["class_ap"].get(c, (math.nan, math.nan)))
                                                          for c in CUE) + " |")
    if tuning and tuning.get("points"):
        md += ["", "Spatial loss weight sweep (held-out split from train, docs/quality/spatial_tuning.md):", "",
               "| point | held-out mAP (last 3) |", "|---|---|"]
        for name, rs in tuning["points"].items():
            if rs:
                s = sum(sum(h["mAP"] for h in r["history"][-3:]) / len(r["history"][-3:]) for r in rs) / len(rs)
                md.append(f"| {name} | {s:.4f} |")
    md += ["", "Per-class AP (mean over seeds):", "",
           "| model | " + " | ".join(CLASSES) + " |", "|---|" + "---|" * len(CLASSES)]
    md.append(f"| teacher {key} | " + " | ".join(f"{trec['class_ap'][c]:.3f}" for c in CLASSES) + " |")
    for kind, a in agg.items():
        md.append(f"| {KIND_LABELS[kind]} | "
                  + " | ".join(f"{a['class_ap'].get(c, (math.nan,))[0]:.3f}" for c in CLASSES) + " |")
    return md


def plots(report_dir: Path, teachers: dict, runs: dict[str, list[dict]], ledger: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = list(TEACHERS)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), sharey=True)
    bars: list[tuple[str, float, float]] = []
    for ax, key in zip(axes, keys, strict=True):
        for kind in ("plain", *CACHED, "online"):
            rs = runs.get("plain" if kind == "plain" else f"{key}-{kind}")
            if not rs:
                continue
            a = aggregate(rs)
            epochs = list(a["curve"])
            mean = [a["curve"][e]["mAP"][0] for e in epochs]
            std = [a["curve"][e]["mAP"][1] for e in epochs]
            (line,) = ax.plot(epochs, mean, marker="o", ms=3, label=KIND_LABELS[kind])
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)], alpha=0.15, color=line.get_color())
            if kind != "plain" or key == keys[0]:  # one bar per machine: seconds never pool across machines
                for machine, xs in seconds_per_epoch_by_machine(ledger, rs).items():
                    bars.append((f"{key if kind != 'plain' else ''} {kind} [{machine}]".strip(), *mean_std(xs)))
        trec = (teachers.get(key) or {}).get("record")
        if trec:
            ax.axhline(trec["final"]["mAP"], color="k", ls="--", lw=1, label=f"teacher {key}")
        ax.set_title(TEACHERS[key].label, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("val mAP (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(report_dir / "map_over_epochs.png", dpi=110)
    plt.close(fig)
    files = ["map_over_epochs.png"]
    if bars:
        fig, ax = plt.subplots(figsize=(max(6, len(bars) * 0.7), 4))
        ax.bar(range(len(bars)), [b[1] for b in bars], yerr=[b[2] for b in bars], capsize=3,
               color=[f"C{i % 10}" for i in range(len(bars))])
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("training seconds per epoch")
        ax.set_title("Cost per epoch by machine (validation excluded; mean ± std over seeds)", fontsize=10)
        fig.tight_layout()
        fig.savefig(report_dir / "time_per_epoch.png", dpi=110)
        plt.close(fig)
        files.append("time_per_epoch.png")
    return files


def write_report(args: argparse.Namespace, teachers: dict, runs: dict[str, list[dict]], tuning: dict | None,
                 plan_lines: list[str], partial: str | None = None) -> None:
    all_records = [r for t in teachers.values() for r in (t.get("record"), t.get("store")) if r]
    all_records += [r for rs in runs.values() for r in rs]
    prov, clean = provenance(all_records)
    if not clean and not args.quick and args.report_dir.resolve() == (Path(__file__).resolve().parents[2] /
                                                                     "docs" / "quality"):
        print("[quality] " + prov[0], flush=True)
        if not args.allow_dirty:
            sys.exit("[quality] refusing to write docs/quality/report.md from mixed commits or a dirty tree "
                     "(pass --allow-dirty to write it flagged, or --report-dir elsewhere)")
    args.report_dir.mkdir(parents=True, exist_ok=True)
    state = git_state(own_outputs=args.report_dir)
    ledger = load_ledger(args.records)
    references = load_references(args)
    if ledger:  # the pieces ran in several sessions, on the machines the ledger lists
        device = "CPU; " + ", ".join(describe(ledger, f"machine {n}") for n in range(1, len(ledger) + 1))
        unlisted = [r.get("record_id") or r.get("what", "?") for r in [*all_records, *references]
                    if machine_of(ledger, r.get("record_id", "")) == UNLISTED]
        if unlisted:
            device += f" (the ledger does not name the machine of {len(unlisted)} record(s): {unlisted[:4]})"
    else:  # one session ran everything: the report's own environment is the pieces'
        threads = os.environ.get("OMP_NUM_THREADS") or f"unset (torch's default, {os.cpu_count()} threads)"
        policy = os.environ.get("OMP_WAIT_POLICY") or "unset (spinning waits, OpenMP's default)"
        device = f"CPU, {os.cpu_count()} cores, OMP_NUM_THREADS {threads}, OMP_WAIT_POLICY {policy}"
    md = ["# bevcache quality report: does distillation beat the plain student?"
          + (" (QUICK SMOKE RUN: not a result)" if args.quick else ""), "", *prov, "",
          *([f"**Partial: {partial} not finished yet** (see the plan at the end).", ""] if partial else []),
          f"Synthetic nuScenes-format data with cameras (`bevcache synth --cameras"
          f"{f' --cue-lidar-trace {args.cue_lidar_trace:g}' if args.cue_lidar_trace else ''}`; "
          f"{cue_text(args.cue_lidar_trace)}): {args.train} train / {args.val} val samples "
          f"(data seed {args.data_seed}). Student `{STUDENT_CFG}` (tiny pillar, pts_neck 256, the teachers' "
          f"augmentation) trained {args.epochs} epochs with a validation after each, {args.seeds} seeds "
          f"(`randomness.seed` 0..{args.seeds - 1}); teachers {args.teacher_epochs} epochs. Cached variants "
          f"read one store per teacher (K={args.views} augmented views, {args.spatial_grid}x{args.spatial_grid} "
          "maps) with augmentation='auto', which replays the views; the online run mirrors the better cached "
          "variant with the live teacher on the augmented batch (augmentation='keep'). Spatial settings: "
          + (f"`{json.dumps(tuning['chosen'])}`, chosen on a held-out split of train "
             "([spatial_tuning.md](spatial_tuning.md))." if tuning and tuning.get("chosen") else "not tuned yet.")
          + f" Device: {device}.", "",
          "Deltas are seed-paired (same seed, same data order): Δ ± the standard error of the paired "
          "differences; 'beats' means Δ > 2 SE. With 3 seeds the SE rests on 2 degrees of freedom: 2 SE is a "
          "loose bar (a two-sided t-test at 5% needs 4.3 SE), and among this many comparisons one can pass it "
          "by chance.", ""]
    answers = {}
    for key in TEACHERS:
        section, answers[key] = teacher_section(args, key, teachers.get(key) or {}, runs, tuning, ledger, references)
        md += section
    files = plots(args.report_dir, teachers, runs, ledger) if any(runs.values()) else []
    md += [f"![{f}]({f})" for f in files]
    md += ["", "## Per run", "", "| run | seed | mAP | NDS | wall s | machine | commit | mAP by epoch |",
           "|---|---|---|---|---|---|---|---|"]
    for variant, rs in runs.items():
        for r in rs:
            g = r.get("git") or {}
            md.append(f"| {variant} | {r['seed']} | {r['final']['mAP']:.4f} | {r['final']['NDS']:.4f} | "
                      f"{r['seconds']:.0f} | {machine_of(ledger, r.get('record_id', ''))} | {g.get('code_short', g.get('short', '?'))}{'' if g.get('clean') else ' dirty'} | "
                      + " ".join(f"{h['mAP']:.3f}" for h in r["history"]) + " |")
    md += ["", "## Cost plan at the time of this report", "", "```", *plan_lines, "```", "",
           f"Report written at commit {state['short']} by `pipelines/quality/run.py --piece report` "
           f"(records under `{rel(args.records)}`)."]
    (args.report_dir / "report.md").write_text("\n".join(md) + "\n")
    results = {"settings": {k: (rel(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "git": state, "clean_measurement": clean, "teachers": teachers, "runs": runs,
               "tuning": tuning, "answers": answers}
    (args.report_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"[quality] report: {args.report_dir / 'report.md'}", flush=True)
