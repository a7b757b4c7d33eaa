"""Fidelity of warped cached BEV maps: cosine of the warped cache vs the live teacher on the augmented input.

`augmentation='warp'` (bevcache/warp.py) distils the student against the teacher's *un-augmented*
cached map, warped into each sample's augmented frame. A network is not exactly equivariant to BEV
flips, rotations and scales (pillars are quantised on a fixed grid, convolutions are not rotation
equivariant, points are truncated per pillar), so the warped cache is an approximation of what the
teacher would have produced on the augmented input. This script measures how good it is, for a
*trained* tiny teacher (configs/tiny_teacher.py, trained here with `bevcache train --plain` when no
checkpoint exists, then reused):

- per transform (horizontal / vertical flip, rotation +-5 and +-22.5 deg, scale 0.95 and 1.05, point
  shuffle alone, and the teacher's full augmented_train_pipeline under the replay views' seeds), the
  per-cell cosine similarity over channels between (i) the cached map (`bevcache extract --spatial
  pts_neck=<grid>`, read back with `store.read_spatial`) warped by `bev_transform(metainfo)` /
  `warp_bev` and (ii) the live teacher map on the augmented input, pooled to the same grid by the
  same code as extraction;
- averaged over all valid cells of each sample (the warp's mask) and over its foreground cells
  (`gaussian_foreground` of the augmented GT boxes > 0.5, valid); then mean, std and percentiles over
  samples;
- baseline: the un-warped cache against the same live map (what distilling without the warp would
  compare); ceiling: the identity row (no augmentation), i.e. the cache against the live teacher on
  the very input it was made from: that is what augmentation replay gives (cosine 1 up to float16
  storage), since replay caches the exact augmented map.

Grids: the tiny teacher's neck is 64 x 64 (0.8 m cells over 51.2 m); stores at 16 and 32 are 4x4 and
2x2 average pools (as 45 and 90 are of BEVFusion-L's 180 x 180 neck), 64 is native.

    .venv/bin/python benchmarks/bench_fidelity.py            # alone on the machine (~10 min on 2 cores with the teacher trained)
    .venv/bin/python benchmarks/bench_fidelity.py --quick    # smoke test (untrained teacher, 6 samples)
"""

from __future__ import annotations

import copy
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from common import (
    REPO,
    TEACHER_CFG,
    fmt_time,
    machine,
    parser,
    random_teacher_checkpoint,
    result_path,
    run_child,
    synth_data,
    table,
    warn_if_busy,
    write_result,
)

NAME = "fidelity"
LAYER = "pts_neck"
DOCS = REPO / "docs" / "spatial"
AUGMENTING = ("GlobalRotScaleTrans", "RandomFlip3D", "PointShuffle")


def _rot(deg: float) -> dict:
    r = float(np.deg2rad(deg))
    return dict(type="GlobalRotScaleTrans", rot_range=[r, r], scale_ratio_range=[1.0, 1.0], translation_std=[0, 0, 0])


def _scale(s: float) -> dict:
    return dict(type="GlobalRotScaleTrans", rot_range=[0.0, 0.0], scale_ratio_range=[s, s], translation_std=[0, 0, 0])


def _flip(h: float, v: float) -> dict:
    return dict(type="RandomFlip3D", sync_2d=False, flip_ratio_bev_horizontal=h, flip_ratio_bev_vertical=v)


# name -> the augmentation steps inserted after LoadAnnotations3D ("full": the teacher's own train pipeline)
TRANSFORMS: dict[str, list[dict] | str] = {
    "identity (ceiling: the exact cache, = replay)": [],
    "horizontal flip": [_flip(1.0, 0.0)],
    "vertical flip": [_flip(0.0, 1.0)],
    "rotation +5 deg": [_rot(5)],
    "rotation -5 deg": [_rot(-5)],
    "rotation +22.5 deg": [_rot(22.5)],
    "rotation -22.5 deg": [_rot(-22.5)],
    "scale 0.95": [_scale(0.95)],
    "scale 1.05": [_scale(1.05)],
    "point shuffle": [dict(type="PointShuffle")],
    "full training augmentation": "full",
}


def rel(path) -> str:
    """Repo-relative path text (committed results hold no machine paths)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------
# Fixtures: a trained teacher, its spatial stores


def teacher_train_cmd(data: Path, work_dir: Path, epochs: int) -> list[str]:
    sched = [f"train_cfg.max_epochs={epochs}", f"train_cfg.val_interval={epochs}", f"param_scheduler.1.end={epochs}",
             f"param_scheduler.1.T_max={epochs}", "randomness.seed=0", "default_hooks.logger.interval=5"]
    return ["-m", "bevcache.cli", "train", "--student", rel(TEACHER_CFG), "--plain", "--work-dir", rel(work_dir),
            "--data-root", rel(data), *[a for item in sched for a in ("--cfg-options", item)]]


def trained_teacher(work: Path, data: Path, epochs: int) -> tuple[Path, dict]:
    """The tiny teacher trained `epochs` epochs on `data` with its augmented pipeline (reused when done)."""
    work_dir = work / "fidelity" / f"teacher-e{epochs}-{data.name}"
    cmd = teacher_train_cmd(data, work_dir, epochs)
    record = {"command": "python " + shlex.join(cmd), "epochs": epochs, "work_dir": rel(work_dir)}
    last = work_dir / "last_checkpoint"
    ckpt = work_dir / f"epoch_{epochs}.pth"
    if not ckpt.is_file():
        print(f"[bench] training the tiny teacher ({epochs} epochs) -> {work_dir}", flush=True)
        t0 = time.perf_counter()
        run_child(cmd)
        record["train_seconds"] = time.perf_counter() - t0
    if not ckpt.is_file():
        sys.exit(f"teacher training left no {ckpt} (last_checkpoint: {last.read_text() if last.is_file() else '-'})")
    scalars = sorted(work_dir.glob("*/vis_data/scalars.json"))
    for path in reversed(scalars):
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        metrics = [x for x in lines if any(k.endswith("/mAP") for k in x)]
        if metrics:
            record["val"] = {k.split("/")[-1]: v for k, v in metrics[-1].items() if k.endswith(("/mAP", "/NDS"))}
            break
    return ckpt, record


def spatial_store(work: Path, data: Path, ckpt: Path, grid: int, tag: str) -> Path:
    """`bevcache extract --spatial pts_neck=<grid>` of the teacher over data's train split (reused when complete)."""
    from bevcache.extract import ExtractOptions, extract
    from bevcache.store import open_store, store_exists

    out = work / "fidelity" / f"store-{tag}-{data.name}-g{grid}.zarr"
    if store_exists(str(out)):
        try:
            if open_store(str(out)).complete_mask().all():
                return out
        except Exception:
            pass
    print(f"[bench] extracting pts_neck={grid} -> {out}", flush=True)
    extract(ExtractOptions(config=str(TEACHER_CFG), checkpoint=str(ckpt), out=str(out), data_root=str(data),
                           spatial=f"{LAYER}={grid}", num_workers=0, overwrite=True, progress=False))
    return out


# ---------------------------------------------------------------------------------------------
# Live teacher maps on augmented inputs, against the warped cache


class _Views:
    """Sample i as view `view` of the teacher's train pipeline (the replay seeds of bevcache.replay)."""

    def __init__(self, dataset, view: int):
        from bevcache.data import dataset_identity
        from bevcache.store import fingerprint_tokens

        self.dataset, self.view = dataset, view
        self.fingerprint = fingerprint_tokens(dataset_identity(dataset)[0])["sha256"]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        from bevcache.replay import augmented_sample

        return augmented_sample(self.dataset, index, self.view, self.fingerprint)


def pipeline_for(cfg, steps: list[dict] | str) -> list[dict]:
    """The teacher's train pipeline with its augmentation replaced by `steps` ('full': kept as is)."""
    from bevcache.data import ensure_index_meta

    base = [dict(s) for s in copy.deepcopy(cfg.augmented_train_pipeline)]
    if steps == "full":
        pipeline = base
    else:
        kept = [s for s in base if s["type"] not in AUGMENTING]
        at = next(i for i, s in enumerate(kept) if s["type"] == "LoadAnnotations3D") + 1
        pipeline = kept[:at] + copy.deepcopy(steps) + kept[at:]
    ensure_index_meta(pipeline)
    return pipeline


METRICS = ("cos_all", "base_all", "cos_fg", "base_fg", "cos_all_c", "base_all_c", "cos_fg_c", "base_fg_c")


def cell_cosine(a, b):
    """Per-cell cosine over channels of [B, C, h, w] maps -> [B, h, w] (0 where a vector is 0)."""
    import torch.nn.functional as F

    return F.cosine_similarity(a, b, dim=1, eps=1e-12)


def neck_branches(cfg) -> list[tuple[int, int, int]]:
    """(first channel, end channel, upsample stride) of each SECONDFPN branch in the neck's output."""
    neck = cfg.model.pts_neck
    if neck.get("type") != "SECONDFPN":
        return []
    out, strides, start = [], list(neck.upsample_strides), 0
    for channels, stride in zip(neck.out_channels, strides, strict=True):
        out.append((start, start + int(channels), int(stride)))
        start += int(channels)
    return out


def measure(args, cfg, data: Path, ckpt: Path, stores: dict[int, Path], rows: list[int]) -> dict:
    """{transform: {grid: {metric: [per-sample values]}}}; also the example figure's maps."""
    import torch

    from bevcache.data import build_base_dataset
    from bevcache.extract import teacher_batches
    from bevcache.features import LayerRecorder, spatial_map
    from bevcache.store import open_store
    from bevcache.teacher import build_teacher
    from bevcache.warp import bev_transform, gaussian_foreground, warp_bev

    pcr = cfg.point_cloud_range
    bev_range = (pcr[0], pcr[1], pcr[3], pcr[4])
    branches = neck_branches(cfg)
    model = build_teacher(cfg, str(ckpt), "cpu")
    recorder = LayerRecorder(model, [LAYER], stop_early=True)
    opened = {g: open_store(str(p)) for g, p in stores.items()}
    batches = [rows[i:i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
    results: dict[str, dict] = {}
    example = None
    for name, steps in TRANSFORMS.items():
        t0 = time.perf_counter()
        dataset = build_base_dataset(cfg, "train", pipeline=pipeline_for(cfg, steps))
        sources = [_Views(dataset, v) for v in range(1, args.views + 1)] if steps == "full" else [dataset]
        per = {g: {k: [] for k in (*METRICS, "valid_frac", "fg_cells",
                                   *[f"{w}_all_x{st}" for w in ("cos", "base") for _, _, st in branches])}
               for g in stores}
        for source in sources:
            for indices, data_batch in teacher_batches(model, source, batches, num_workers=0):
                with torch.inference_mode():
                    recorder.run(model, **data_batch, mode="predict")
                samples = data_batch["data_samples"]
                transforms = torch.as_tensor(np.stack([bev_transform(s.metainfo) for s in samples]),
                                             dtype=torch.float32)
                for g, store in opened.items():
                    live = spatial_map(recorder.outputs[LAYER], (g, g), len(samples)).float()  # [B, C, g, g]
                    cached = torch.from_numpy(store.read_spatial(LAYER, indices)).float()  # [B, C, g, g]
                    warped, valid = warp_bev(cached, transforms, bev_range)
                    fg = torch.stack([gaussian_foreground(s.gt_instances_3d.bboxes_3d, bev_range, (g, g))
                                      for s in samples])  # [B, g, g]
                    valid = valid[:, 0] > 0  # [B, g, g]
                    fg_mask = (fg > 0.5) & valid
                    # centred: minus the live map's mean feature over its valid cells (per sample), so the
                    # shared component every cell carries does not count as agreement
                    mu = ((live * valid[:, None]).sum((2, 3)) / valid.sum((1, 2)).clamp_min(1)[:, None])[..., None, None]
                    cosines = {"cos": cell_cosine(warped, live), "base": cell_cosine(cached, live),
                               "cos_c": cell_cosine(warped - mu, live - mu), "base_c": cell_cosine(cached - mu, live - mu)}
                    by_branch = {f"{w}_all_x{st}": cell_cosine(m[:, lo:hi], live[:, lo:hi])
                                 for lo, hi, st in branches for w, m in (("cos", warped), ("base", cached))}
                    for b in range(len(samples)):
                        v, f = valid[b], fg_mask[b]
                        for key, cos in by_branch.items():
                            per[g][key].append(float(cos[b][v].mean()))
                        per[g]["valid_frac"].append(float(v.float().mean()))
                        per[g]["fg_cells"].append(int(f.sum()))
                        for key, cos in cosines.items():
                            kind, centred = key.split("_")[0], key.endswith("_c")
                            per[g][f"{kind}_all{'_c' if centred else ''}"].append(float(cos[b][v].mean()))
                            if f.any():
                                per[g][f"{kind}_fg{'_c' if centred else ''}"].append(float(cos[b][f].mean()))
                    if name == args.example and g == args.primary_grid and example is None:
                        example = {"row": int(indices[0]), "grid": g, "cached": cached[0], "warped": warped[0],
                                   "live": live[0], "cos": cos[0], "valid": valid[0], "fg": fg[0]}
        results[name] = per
        g0 = args.primary_grid
        print(f"[bench] {name:<46} g={g0}: warped {statistics.fmean(per[g0]['cos_all']):.3f} / fg "
              f"{_mean(per[g0]['cos_fg']):.3f}; un-warped {statistics.fmean(per[g0]['base_all']):.3f} / fg "
              f"{_mean(per[g0]['base_fg']):.3f} ({fmt_time(time.perf_counter() - t0)})", flush=True)
    recorder.remove()
    return {"per_sample": results, "example": example}


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def summarise(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    a = np.asarray(xs, dtype=np.float64)
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "p10": float(np.percentile(a, 10)), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "min": float(a.min())}


def fmt(s: dict) -> str:
    return "-" if not s.get("n") else f"{s['mean']:.3f} ± {s['std']:.3f}"


# ---------------------------------------------------------------------------------------------
# Figures


def figures(summary: dict, example: dict | None, grids: list[int], primary: int, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    names = list(summary)
    shown = [g for g in FIGURE_GRIDS if str(g) in summary[names[0]]] or [primary]
    fig, grid_axes = plt.subplots(len(shown), 2, figsize=(12, 0.45 * len(names) * len(shown) + 1.2), sharey=True,
                                  squeeze=False)
    y = np.arange(len(names))
    for g, axes in zip(shown, grid_axes, strict=True):
        for ax, (key, base_key, title) in zip(axes, (("cos_all", "base_all", "all valid cells"),
                                                     ("cos_fg", "base_fg", "foreground cells (fg > 0.5)")), strict=True):
            for off, k, label, color in ((-0.2, key, "cache warped (augmentation='warp')", "tab:blue"),
                                         (0.2, base_key, "cache not warped (baseline)", "tab:gray")):
                means = [summary[n][str(g)][k].get("mean", np.nan) for n in names]
                stds = [summary[n][str(g)][k].get("std", 0) for n in names]
                ax.barh(y + off, means, height=0.38, xerr=stds, color=color, label=label, capsize=2)
            ax.set_title(f"{title}, grid {g}x{g}")
            ax.set_xlim(0, 1.02)
            ax.axvline(1.0, color="k", lw=0.8)
            ax.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(y, names)
    grid_axes[0][0].invert_yaxis()
    for ax in grid_axes[-1]:
        ax.set_xlabel("cosine to the live teacher map (mean ± std over samples)")
    handles, labels = grid_axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = out_dir / "fidelity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    if example is not None:
        norm = lambda m: m.norm(dim=0).numpy()  # noqa: E731  [h, w] channel norm
        valid = example["valid"].numpy()
        panels = [("cached map (un-augmented frame)", norm(example["cached"]), "viridis"),
                  ("cache warped into the augmented frame", np.where(valid, norm(example["warped"]), np.nan), "viridis"),
                  ("live teacher on the augmented input", norm(example["live"]), "viridis"),
                  ("per-cell cosine (warped vs live)", np.where(example["valid"].numpy(), example["cos"].numpy(),
                                                                np.nan), "magma")]
        top = float(max(np.nanmax(img) for _, img, cmap in panels if cmap == "viridis"))
        fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
        for ax, (title, img, cmap) in zip(axes, panels, strict=True):
            im = ax.imshow(img, origin="lower", cmap=cmap, vmin=0, vmax=1 if cmap == "magma" else top)
            ax.set_title(title, fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.046)
        axes[2].contour(example["fg"].numpy(), levels=[0.5], colors="w", linewidths=0.8, origin="lower")
        axes[3].contour(example["fg"].numpy(), levels=[0.5], colors="c", linewidths=0.8, origin="lower")
        fig.suptitle(f"sample {example['row']}, {EXAMPLE_TITLE}, pts_neck channel norm at grid "
                     f"{example['grid']}x{example['grid']} (contours: foreground > 0.5; x right, y up)", fontsize=10)
        fig.tight_layout()
        path = out_dir / "warp_example.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return [rel(p) for p in written]


EXAMPLE_TITLE = "rotation +22.5 deg"
FIGURE_GRIDS = (16, 32)  # rows of docs/spatial/fidelity.png


def fidelity_md(result: dict, rows_by_grid: dict[int, str], centred: str, branches: str, primary: int,
                figures_written: list[str]) -> str:
    git = result["machine"]["git"]
    t = result["teacher"]
    val = t.get("val") or {}
    lines = [
        "# Fidelity of warped cached BEV maps",
        "",
        f"Commit `{git['commit']}`{' (dirty tree)' if git['dirty'] else ''}, {result['machine']['date']}; "
        f"made by `{result['command']}`.",
        "",
        "Cosine similarity, per BEV cell over the 512 channels of the tiny teacher's `pts_neck`, between the map "
        "`augmentation='warp'` distils against (the un-augmented cached map, `bevcache extract --spatial "
        "pts_neck=<grid>`, warped by `bev_transform(metainfo)` / `warp_bev`) and the live teacher map on the "
        "augmented input (pooled to the same grid by extraction's own code). Each sample's cells are averaged "
        "over all valid cells (the warp's mask) and over foreground cells (`gaussian_foreground` of the "
        "augmented GT boxes > 0.5); the table gives mean ± std over samples (p10, median, p90 and min in "
        "`benchmarks/results/fidelity.json`).",
        "",
        f"- Teacher: `configs/tiny_teacher.py` trained {t['epochs']} epochs on {result['train_samples']} synthetic "
        f"samples with its augmented pipeline (`{t['command']}`)"
        + (f"; val mAP {val.get('mAP', float('nan')):.3f}, NDS {val.get('NDS', float('nan')):.3f} on "
           f"{result['val_samples']} val samples" if val else "") + ".",
        f"- Samples: {result['samples']} training samples (the split a store is made of); the full training "
        f"augmentation row draws {result['views']} views per sample with the replay seeds "
        "(`bevcache.replay.augmented_sample`), i.e. random rotation ±22.5°, scale 0.95–1.05, both flips at 0.5 "
        "and point shuffle.",
        "- Baseline: the cached map *not* warped, against the same live map and cells (what distilling an "
        "augmented student against the plain cache compares). Ceiling: the identity row — the cache against the "
        "live teacher on the very input it was made from, which is what augmentation replay gives (replay caches "
        "the exact augmented map: cosine 1 up to float16 storage).",
        "- Grids: the tiny teacher's neck is 64 × 64 (0.8 m cells over 51.2 m); 16 and 32 are 4 × 4 and 2 × 2 "
        "average pools, as 45 and 90 are of BEVFusion-L's 180 × 180 neck.",
        "",
        f"## Grid {primary} × {primary}",
        "",
        rows_by_grid[primary],
        "",
        f"Centred (both maps minus the live map's mean feature over the sample's valid cells, so the component "
        f"every cell shares does not count as agreement), grid {primary} × {primary}:",
        "",
        centred,
        "",
    ]
    for g, text in rows_by_grid.items():
        if g != primary:
            lines += [f"## Grid {g} × {g}", "", text, ""]
    if branches:
        lines += ["## By neck branch", "",
                  "Warped vs live, all valid cells, per SECONDFPN branch of `pts_neck` (channels 0–127 come from the "
                  "stride-2 block through a 1 × 1 convolution, 128–255 through a ×2 deconvolution, 256–511 through a ×4 "
                  "deconvolution); each cell: mean over samples, branches ×1 / ×2 / ×4.", "", branches, ""]
    lines += ["## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figures_written] + [""]
    return "\n".join(lines)


def branch_table(summary: dict, grids: list[int], strides: list[int]) -> str:
    """Warped vs live over all valid cells, by neck branch (its deconvolution's upsample stride)."""
    rows = []
    for name, by_grid in summary.items():
        cells = [" / ".join(f"{by_grid[str(g)][f'cos_all_x{st}']['mean']:.2f}" for st in strides) for g in grids]
        rows.append([name, *cells])
    head = " / ".join(f"x{st}" for st in strides)
    return table(["transform", *[f"grid {g}: {head}" for g in grids]], rows)


def grid_table(summary: dict, g: int, centred: bool = False) -> str:
    c = "_c" if centred else ""
    rows = []
    for name, by_grid in summary.items():
        s = by_grid[str(g)]
        rows.append([name, fmt(s["cos_all" + c]), fmt(s["base_all" + c]), fmt(s["cos_fg" + c]), fmt(s["base_fg" + c]),
                     f"{s['valid_frac']['mean']:.3f}", f"{s['fg_cells']['mean']:.1f}"])
    return table(["transform", "warped, all cells", "un-warped, all cells", "warped, foreground", "un-warped, foreground",
                  "valid fraction", "fg cells/sample"], rows)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--train-samples", type=int, default=100, help="Synthetic training samples (teacher and store).")
    p.add_argument("--val-samples", type=int, default=16)
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--samples", type=int, default=100, help="Training samples measured (the first N rows).")
    p.add_argument("--views", type=int, default=2, help="Views per sample of the full training augmentation.")
    p.add_argument("--grids", default="16,32,64", help="Store grids (the tiny teacher's neck is 64x64).")
    p.add_argument("--primary-grid", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--example", default="rotation +22.5 deg", help="Transform shown in docs/spatial/warp_example.png.")
    p.add_argument("--docs", default=str(DOCS), help="Where the table and figures go (quick: the scratch folder).")
    p.add_argument("--per-sample", action="store_true", help="Also write every sample's values to the JSON (~1 MB).")
    p.add_argument("--replot", action="store_true",
                   help="Only redraw docs/spatial/fidelity.png from the result JSON (no measurement).")
    args = p.parse_args()
    argv = sys.argv[1:]
    if args.replot:
        saved = json.loads(result_path(NAME, args).read_text())
        print(figures(saved["summary"], None, saved["grids"], saved["primary_grid"], Path(args.docs)))
        return
    if args.quick:
        args.train_samples, args.val_samples, args.samples, args.views, args.grids = 6, 2, 6, 1, "16,32"
        args.docs = str(Path(args.work) / "quick" / "docs-spatial")
    grids = [int(g) for g in args.grids.split(",")]
    if args.primary_grid not in grids:
        args.primary_grid = grids[-1]
    global EXAMPLE_TITLE
    EXAMPLE_TITLE = args.example
    warn_if_busy()
    mach = machine()
    work = Path(args.work) / ("quick" if args.quick else "")
    data = synth_data(work, args.train_samples, args.val_samples)
    if args.quick:
        ckpt, teacher = random_teacher_checkpoint(work), {"command": "(random init: --quick)", "epochs": 0}
    else:
        ckpt, teacher = trained_teacher(work, data, args.teacher_epochs)
    tag = "random" if args.quick else f"e{args.teacher_epochs}"
    stores = {g: spatial_store(work, data, ckpt, g, tag) for g in grids}

    from bevcache.data import set_data_root
    from bevcache.runtime import load_config, setup_runtime

    setup_runtime()
    cfg = load_config(TEACHER_CFG)
    set_data_root(cfg, str(data))
    rows = list(range(min(args.samples, args.train_samples)))
    t0 = time.perf_counter()
    measured = measure(args, cfg, data, ckpt, stores, rows)
    seconds = time.perf_counter() - t0

    summary = {name: {str(g): {k: summarise(v) for k, v in per[g].items()} for g in grids}
               for name, per in measured["per_sample"].items()}
    command = "python benchmarks/bench_fidelity.py" + (" " + shlex.join(argv) if argv else "")
    result = {"command": command, "train_samples": args.train_samples, "val_samples": args.val_samples,
              "samples": len(rows), "views": args.views, "grids": grids, "primary_grid": args.primary_grid,
              "teacher": teacher, "stores": {str(g): rel(s) for g, s in stores.items()}, "bev_layer": LAYER,
              "measure_seconds": seconds, "summary": summary}
    if args.per_sample:  # ~1 MB: kept out of the committed results by default
        result["per_sample"] = {name: {str(g): v for g, v in per.items()} for name, per in measured["per_sample"].items()}
    by_grid = {g: grid_table(summary, g) for g in [args.primary_grid] + [g for g in grids if g != args.primary_grid]}
    centred = grid_table(summary, args.primary_grid, centred=True)
    strides = [st for _, _, st in neck_branches(cfg)]
    branches = branch_table(summary, grids, strides) if strides else ""
    print(f"\n### Fidelity of warped cached maps, trained tiny teacher pts_neck, {len(rows)} samples, grid "
          f"{args.primary_grid} (cosine to the live teacher on the augmented input, mean ± std over samples)\n")
    print(by_grid[args.primary_grid])
    print(f"\ncentred (minus the live map's mean feature), grid {args.primary_grid}:\n\n{centred}")
    if branches:
        print(f"\nwarped, all cells, by neck branch (upsample stride):\n\n{branches}")
    for g in grids:
        if g != args.primary_grid:
            print(f"\ngrid {g}:\n\n{by_grid[g]}")
    docs = Path(args.docs)
    result["machine"] = mach
    written = figures(summary, measured["example"], grids, args.primary_grid, docs)
    result["figures"] = written
    (docs / "fidelity.md").write_text(fidelity_md(result, by_grid, centred, branches, args.primary_grid, written))
    print(f"\ndocs: {rel(docs / 'fidelity.md')} and {written}")
    result.pop("machine")
    args.work, args.docs = rel(args.work), rel(args.docs)
    write_result(NAME, args, result, mach)
    path = result_path(NAME, args)
    text = path.read_text()
    if str(REPO) in text:
        sys.exit(f"{path} holds the machine path {REPO}: fix the benchmark before committing it")


if __name__ == "__main__":
    main()
