"""Cost of augmentation replay: extraction time and store size by K augmented views per sample.

In one process, interleaved repetitions of `bevcache.extract.extract(..., views=K)` for every K
(the tiny teacher's pts_neck, float16), timed by extract's own loop clock (loader + teacher +
writes, not the model build). Expected: time ~ (1 + K) x K=0 plus the training pipeline's extra
work (annotations, augmentation), store size ~ (1 + K) x K=0 vectors.

    .venv/bin/python benchmarks/bench_views.py            # alone on the machine
    .venv/bin/python benchmarks/bench_views.py --quick    # smoke test
"""

from __future__ import annotations

from pathlib import Path

from common import (
    TEACHER_CFG,
    fmt_bytes,
    fmt_time,
    machine,
    parser,
    random_teacher_checkpoint,
    stats,
    synth_data,
    table,
    warn_if_busy,
    write_result,
)

NAME = "views"


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=96, help="Synthetic training samples extracted per pass.")
    p.add_argument("--views", default="0,2,4,8", help="The K to compare.")
    p.add_argument("--batch-size", type=int, default=4, help="(tiny_teacher.py's bevcache.batch_size)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers.")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    if args.quick:
        args.samples, args.views, args.workers, args.reps = 8, "0,2", 0, 1
    ks = [int(k) for k in args.views.split(",")]
    warn_if_busy()
    mach = machine()
    work = Path(args.work) / ("quick" if args.quick else "")
    data = synth_data(work, args.samples, 2)
    ckpt = random_teacher_checkpoint(work)

    from bevcache.extract import ExtractOptions, extract

    def run(k: int) -> dict:
        return extract(ExtractOptions(config=str(TEACHER_CFG), checkpoint=str(ckpt), out=str(work / f"views-{k}.zarr"),
                                      data_root=str(data), batch_size=args.batch_size, num_workers=args.workers,
                                      dtype="float16", views=k, overwrite=True, progress=False))

    run(ks[0])  # warm-up: imports, first model build, page cache
    seconds: dict[int, list[float]] = {k: [] for k in ks}
    size: dict[int, int] = {}
    for rep in range(args.reps):
        for k in ks if rep % 2 == 0 else reversed(ks):  # alternate the order against drift
            info = run(k)
            seconds[k].append(info["seconds"])
            size[k] = info["bytes_on_disk"]
            print(f"[bench] rep {rep + 1}/{args.reps} K={k}: {info['seconds']:.2f} s, {size[k]} B", flush=True)
    base = stats(seconds[ks[0]])["median"]
    result = {"samples": args.samples, "by_views": {
        k: {"seconds": stats(seconds[k]), "bytes_on_disk": size[k], "bytes_per_sample": size[k] / args.samples,
            "time_ratio_vs_first": stats(seconds[k])["median"] / base} for k in ks}}
    rows = [[k, fmt_time(stats(seconds[k])["median"]), fmt_time(stats(seconds[k])["iqr"]),
             f"{stats(seconds[k])['median'] / base:.2f}", f"{1 + k}", fmt_bytes(size[k]),
             f"{size[k] / args.samples:.0f}", f"{size[k] / size[ks[0]]:.2f}"] for k in ks]
    print(f"\n### Extraction by K augmented views, tiny teacher pts_neck float16, {args.samples} samples, "
          f"batch {args.batch_size}, {args.workers} loader workers, {args.reps} reps, CPU {mach['cpu_model']}\n")
    print(table(["K", "loop time median", "IQR", f"× K={ks[0]}", "teacher passes", "store", "B/sample",
                 f"size × K={ks[0]}"], rows))
    write_result(NAME, args, result, mach)


if __name__ == "__main__":
    main()
