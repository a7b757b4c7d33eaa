"""Seconds per training step: plain student vs student + cached CRD vs online CRD (teacher every step).

All three train configs/tiny_student.py on the same synthetic data, batch size and seed, built by
`bevcache.train.build_train_config` and run by mmengine's Runner with an IterBasedTrainLoop (as
`short_run` in tests/test_train.py). Two hooks time each iteration from `before_train_iter` (run
last) to `after_train_iter` (run first): the model's train_step, i.e. preprocessing (voxelisation),
forward, CRD, backward and optimizer step, without data loading or logging. The first iterations
are warm-up and dropped.

Each variant runs in its own subprocess, so its peak RSS (getrusage maxrss) is its own; the parent
runs the variants interleaved (rotating the order every repetition) so slow drifts of the machine
hit all of them alike, and reports cached/plain (target <= 1.05) and online/cached.

    .venv/bin/python benchmarks/bench_train_step.py            # full (alone on the machine)
    .venv/bin/python benchmarks/bench_train_step.py --quick    # smoke test

The same comparison on a quality run's student and store (pipelines/quality), side by side, instead
of the quality records' per-run epoch times taken hours apart:

    .venv/bin/python benchmarks/bench_train_step.py --variants plain,cached \
        --student configs/tiny_student_replay.py --distill augmentation=auto \
        --use-data data/quality-cam-160-40-s0 --use-store work_dirs/quality/stores/T2-views20-spatial32 \
        --out benchmarks/results/train_step_quality_T2.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from common import (
    STUDENT_CFG,
    TEACHER_CFG,
    cuda_peak_mib,
    fmt_stat,
    machine,
    parser,
    peak_rss_mib,
    random_teacher_checkpoint,
    result_path,
    run_child,
    stats,
    sync,
    synth_data,
    table,
    teacher_store,
    warn_if_busy,
    write_result,
)

NAME = "train_step"
VARIANTS = ("plain", "cached", "online")
LABELS = {"plain": "(a) plain student", "cached": "(b) student + cached CRD", "online": "(c) online CRD (teacher each step)"}


# ---------------------------------------------------------------------------------------------
# Child: one variant, one Runner


def _short_run(cfg, work_dir: Path, iters: int, *, batch_size: int, workers: int, seed: int):
    """Iteration-based, tiny, no validation/checkpoints, constant LR (bevcache.train.iteration_run)."""
    from tests.conftest import iteration_run  # the suite's short-run helper

    cfg = iteration_run(cfg, work_dir=work_dir, iters=iters, batch_size=batch_size, workers=workers, seed=seed)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=10)
    cfg.log_processor = dict(type="LogProcessor", window_size=10, by_epoch=False)
    return cfg


def child(args) -> None:
    t_start = time.perf_counter()
    import torch
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    from bevcache.train import TrainOptions, build_train_config

    class StepStart(Hook):
        def __init__(self):
            self.t = None
            self.first = None

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            sync()
            self.t = time.perf_counter()
            if self.first is None:
                self.first = self.t

    class StepEnd(Hook):
        def __init__(self, start: StepStart):
            self.start, self.times = start, []

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            sync()
            self.times.append(time.perf_counter() - self.start.t)

    opts = TrainOptions(student=args.student, data_root=args.data_root, plain=args.child == "plain",
                        cache=args.store if args.child == "cached" else None,
                        distill_options=tuple(args.distill) if args.child != "plain" else (),
                        teacher_online=args.teacher if args.child == "online" else None,
                        teacher_checkpoint=args.checkpoint if args.child == "online" else None)
    cfg = build_train_config(opts)
    cfg = _short_run(cfg, Path(args.work) / "runs" / args.child, args.warmup + args.iters,
                     batch_size=args.batch_size, workers=args.workers, seed=args.seed)
    runner = Runner.from_cfg(cfg)
    from bevcache.crd import CRDLoss

    # The negatives each step draws: CRDDistiller clamps the config's nce_k below the store's row count.
    nce_ks = {m.nce_k for m in runner.model.modules() if isinstance(m, CRDLoss)}
    nce_k = max(nce_ks) if nce_ks else None
    start = StepStart()
    end = StepEnd(start)
    runner.register_hook(start, priority="LOWEST")  # its before_train_iter runs after every other hook's
    runner.register_hook(end, priority="HIGHEST")  # its after_train_iter runs before every other hook's
    profile = None
    if args.profile:  # profile the timed iterations only (started once the warm-up is over)
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        profile = profile(activities=activities, record_shapes=True)

        class StartProfile(Hook):
            def before_train_iter(self, runner, batch_idx, data_batch=None):
                if runner.iter == args.warmup:
                    profile.start()

        runner.register_hook(StartProfile(), priority="HIGHEST")
    runner.train()
    if profile is not None:
        profile.stop()
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        Path(args.profile).write_text(
            "By operator:\n" + profile.key_averages().table(sort_by=sort, row_limit=30)
            + "\n\nBy operator and input shapes:\n"
            + profile.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=20, max_name_column_width=40))
    n_params = sum(p.numel() for p in runner.model.parameters() if p.requires_grad)
    result = {
        "variant": args.child,
        "step_seconds": end.times[args.warmup:],
        "warmup_seconds": end.times[:args.warmup],
        "setup_seconds": (start.first or time.perf_counter()) - t_start,  # imports, config, Runner, 1st batch
        "peak_rss_mib": peak_rss_mib(),
        "cuda_peak_mib": cuda_peak_mib(),
        "trainable_params": n_params,
        "nce_k": nce_k,
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.child_out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Parent: fixtures, interleaved repetitions, table


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--train-samples", type=int, default=400, help="Synthetic training samples (= CRD n_data).")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (loading is outside the timing).")
    p.add_argument("--warmup", type=int, default=5, help="Iterations dropped at the start of each run.")
    p.add_argument("--iters", type=int, default=30, help="Timed iterations per run.")
    p.add_argument("--reps", type=int, default=3, help="Runs per variant (interleaved).")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--student", default=str(STUDENT_CFG), help="Student config of every variant.")
    p.add_argument("--distill", action="append", default=[], metavar="KEY=VALUE",
                   help="A distill setting of the cached and online variants (repeatable), e.g. augmentation=auto.")
    p.add_argument("--use-data", default=None, metavar="ROOT",
                   help="Time on this data root instead of a synthetic one made here (needs --use-store).")
    p.add_argument("--use-store", default=None, metavar="STORE",
                   help="The cached variant reads this store (of --use-data) instead of a random teacher's.")
    p.add_argument("--teacher", default=None,
                   help="Online variant's teacher config [default: the tiny teacher; with --use-store, required "
                        "with --teacher-checkpoint for the online variant].")
    p.add_argument("--teacher-checkpoint", default=None, help="Online variant's teacher weights (with --teacher).")
    p.add_argument("--profile", default=None, metavar="VARIANT",
                   help="Also run VARIANT once under torch.profiler; the op table goes next to the results.")
    # child-only arguments
    p.add_argument("--child", choices=VARIANTS, help="(internal) run one variant and write --child-out")
    p.add_argument("--child-out")
    p.add_argument("--data-root")
    p.add_argument("--store")
    p.add_argument("--checkpoint")
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.train_samples, args.batch_size, args.warmup, args.iters, args.reps = 8, 2, 1, 2, 1
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    if bool(args.use_data) != bool(args.use_store):
        sys.exit("--use-data and --use-store go together: the store's rows are that data root's samples")
    if args.use_store and "online" in variants and not (args.teacher and args.teacher_checkpoint):
        sys.exit("the online variant on --use-store needs the store's teacher: --teacher CFG --teacher-checkpoint PTH "
                 "(or leave it out: --variants plain,cached)")
    if args.use_store and not Path(args.use_store).is_dir():
        sys.exit(f"--use-store {args.use_store}: no such store; extract it first (pipelines/quality/run.py, "
                 "--piece teacher-<T> --only step=extract)")
    warn_if_busy()
    mach = machine()
    work = Path(args.work) / ("quick" if args.quick else "")
    if args.use_store:
        data, store, ckpt = Path(args.use_data), Path(args.use_store), args.teacher_checkpoint
        args.train_samples = None  # the store's; n_data comes from it
    else:
        data = synth_data(work, args.train_samples, max(2, args.train_samples // 8))
        ckpt = random_teacher_checkpoint(work)
        store = teacher_store(work, data, ckpt)
    teacher = args.teacher or str(TEACHER_CFG)

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    common_args = ["--work", str(work), "--data-root", str(data), "--store", str(store), "--checkpoint", str(ckpt or ""),
                   "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--warmup", str(args.warmup),
                   "--iters", str(args.iters), "--seed", str(args.seed), "--student", args.student,
                   "--teacher", teacher, *[f"--distill={d}" for d in args.distill]]
    for rep in range(args.reps):
        order = variants[rep % len(variants):] + variants[:rep % len(variants)]  # rotate: no fixed position
        for variant in order:
            out = work / "runs" / f"{variant}-rep{rep}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            run_child([__file__, "--child", variant, "--child-out", str(out), *common_args])
            runs[variant].append(json.loads(out.read_text()))
            print(f"[bench] rep {rep + 1}/{args.reps} {variant:<6}: median step "
                  f"{statistics.median(runs[variant][-1]['step_seconds']):.3f} s ({time.perf_counter() - t0:.0f} s run)",
                  flush=True)
    profile_path = None
    if args.profile:
        profile_path = result_path(NAME, args).with_name(f"{NAME}_profile_{args.profile}.txt")
        profile_path.parent.mkdir(parents=True, exist_ok=True)
        out = work / "runs" / f"{args.profile}-profile.json"
        run_child([__file__, "--child", args.profile, "--child-out", str(out), "--profile", str(profile_path), *common_args])
        print(f"[bench] profile of {args.profile}: {profile_path}", flush=True)

    summary = {}
    for v in variants:
        pooled = [t for r in runs[v] for t in r["step_seconds"]]
        summary[v] = {
            "step": stats(pooled),
            "per_rep_median": [statistics.median(r["step_seconds"]) for r in runs[v]],
            "setup": stats([r["setup_seconds"] for r in runs[v]]),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs[v]),
            "cuda_peak_mib": max((r["cuda_peak_mib"] or 0) for r in runs[v]) if runs[v][0]["cuda_peak_mib"] is not None else None,
            "trainable_params": runs[v][0]["trainable_params"],
            "nce_k": runs[v][0]["nce_k"],
        }

    def ratio(a: str, b: str) -> dict | None:
        if a not in summary or b not in summary:
            return None
        per_rep = [x / y for x, y in zip(summary[a]["per_rep_median"], summary[b]["per_rep_median"], strict=True)]
        return {"of_medians": summary[a]["step"]["median"] / summary[b]["step"]["median"],
                "per_rep": per_rep, "min": min(per_rep), "max": max(per_rep)}

    ratios = {"cached/plain": ratio("cached", "plain"), "online/cached": ratio("online", "cached"),
              "online/plain": ratio("online", "plain")}
    base = summary.get("plain", {}).get("step", {}).get("median")
    rows = []
    for v in variants:
        s = summary[v]
        rel = f"{s['step']['median'] / base:.3f}" if base else "-"
        rows.append([LABELS[v], fmt_stat(s["step"]), rel, f"{s['peak_rss_mib']:.0f}",
                     f"{s['cuda_peak_mib']:.0f}" if s["cuda_peak_mib"] is not None else "-",
                     f"{s['setup']['median']:.1f} s", s["nce_k"] if s["nce_k"] is not None else "-"])
    dev = mach["cuda"]["device"] if mach["cuda"] else f"CPU {mach['cpu_model']} ({mach['torch_threads']} threads)"
    print(f"\n### Training step, {Path(args.student).name}{' ' + ' '.join(args.distill) if args.distill else ''}, "
          f"batch {args.batch_size}, n_data {args.train_samples or 'of ' + str(store)}, "
          f"{args.reps} x {args.iters} timed steps after {args.warmup} warm-up, on {dev}\n")
    print(table(["variant", "s/step median (IQR)", "vs plain", "peak RSS MiB", "CUDA peak MiB", "setup", "nce_k"], rows))
    print()
    for key, r in ratios.items():
        if r:
            target = "  (target <= 1.05: " + ("met" if r["of_medians"] <= 1.05 else "NOT met") + ")" if key == "cached/plain" else ""
            print(f"- {key}: {r['of_medians']:.3f} (per repetition {r['min']:.3f}..{r['max']:.3f}){target}")
    print("- nce_k is the negatives drawn per step: n_data is the synthetic set's size, so the config's value is "
          "clamped to n_data - 1; bench_crd.py measures CRD at nce_k 16384 and real dataset sizes.")
    write_result(NAME, args, {"variants": summary, "ratios": ratios, "runs": runs,
                              "profile": str(profile_path) if profile_path else None}, mach)


if __name__ == "__main__":
    main()
