"""`bevcache.crd.CRDLoss` step time (forward + backward + memory-bank update) vs nce_k and num_data.

B=4 samples, student 256-d, teacher 512-d, feat_dim 128 (bevcache's defaults), training mode (the
banks and Z update every step). nce_k above num_data - 1 is clamped as `bevcache train` clamps it.

A second table isolates how one side's K+1 scores are computed, forward + backward:
  - "full bank" (what CRDLoss does): exp(e @ bank.T.clone()).gather(contrast): clones and scores
    all N bank rows, then keeps K+1 per sample: cost grows with N;
  - "gather rows" (RepDistiller's way): bank[contrast] [B, K+1, F] then a batched product: cost
    grows with B * K, whatever N.
so the crossover is visible at real dataset sizes.

    .venv/bin/python benchmarks/bench_crd.py            # full (alone on the machine)
    .venv/bin/python benchmarks/bench_crd.py --quick    # smoke test
"""

from __future__ import annotations

from common import (
    device,
    fmt_stat,
    machine,
    parser,
    stats,
    table,
    time_repeated,
    warn_if_busy,
    write_result,
)

NAME = "crd"


def crd_step_times(num_data: int, nce_k: int, args, dev) -> list[float]:
    import torch

    from bevcache.crd import CRDLoss

    torch.manual_seed(0)
    crd = CRDLoss(student_dim=args.student_dim, teacher_dim=args.teacher_dim, num_data=num_data,
                  feat_dim=args.feat_dim, nce_k=nce_k).to(dev).train()
    f_s = torch.randn(args.batch, args.student_dim, device=dev, requires_grad=True)  # stands in for the student
    f_t = torch.rand(args.batch, args.teacher_dim, device=dev)  # cached teacher rows (non-negative)
    gen = torch.Generator().manual_seed(1)
    indices = [torch.randperm(num_data, generator=gen)[: args.batch].to(dev) for _ in range(args.warmup + args.reps)]
    it = iter(indices)

    def step():
        crd.zero_grad(set_to_none=True)
        f_s.grad = None
        loss = crd(f_s, f_t, next(it))
        loss.backward()

    return time_repeated(step, warmup=args.warmup, repeats=args.reps)


def score_times(num_data: int, nce_k: int, how: str, args, dev) -> list[float]:
    """One side's [B, K+1] exp-scores, forward + backward, computed the two ways."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    bank = F.normalize(torch.randn(num_data, args.feat_dim, device=dev), dim=1)
    emb = torch.randn(args.batch, args.feat_dim, device=dev, requires_grad=True)
    contrast = torch.randint(0, num_data, (args.batch, nce_k + 1), device=dev)

    def full():
        e = F.normalize(emb, dim=1)
        s = torch.exp((e @ bank.T.clone()).gather(1, contrast) / 0.07)
        s.sum().backward()

    def gathered():
        e = F.normalize(emb, dim=1)
        rows = bank[contrast]  # [B, K+1, F]
        s = torch.exp(torch.bmm(rows, e.unsqueeze(2)).squeeze(2) / 0.07)
        s.sum().backward()

    return time_repeated(full if how == "full" else gathered, warmup=args.warmup, repeats=args.reps)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--nce-k", default="1024,4096,16384")
    p.add_argument("--num-data", default="5000,28130,200000", help="(28130 = nuScenes train)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--student-dim", type=int, default=256)
    p.add_argument("--teacher-dim", type=int, default=512)
    p.add_argument("--feat-dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--profile", action="store_true", help="torch.profiler op table of the largest configuration.")
    args = p.parse_args()
    if args.quick:
        args.nce_k, args.num_data, args.warmup, args.reps = "1024,4096", "5000,28130", 2, 5
    warn_if_busy()
    mach = machine()
    import torch

    dev = device()
    ks = [int(x) for x in args.nce_k.split(",") if x]
    ns = [int(x) for x in args.num_data.split(",") if x]
    steps, scores = {}, {}
    for n in ns:
        for k in ks:
            eff = min(k, n - 1)
            key = f"N={n},K={k}"
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            steps[key] = {"num_data": n, "nce_k": k, "nce_k_used": eff,
                          "step": stats(crd_step_times(n, eff, args, dev)),
                          "bank_bytes": 2 * n * args.feat_dim * 4,
                          "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}
            scores[key] = {how: stats(score_times(n, eff, how, args, dev)) for how in ("full", "gather")}
            print(f"[bench] {key}: step {fmt_stat(steps[key]['step'])}; scores full {fmt_stat(scores[key]['full'])}, "
                  f"gather {fmt_stat(scores[key]['gather'])}", flush=True)

    where = mach["cuda"]["device"] if mach["cuda"] else f"CPU {mach['cpu_model']} ({torch.get_num_threads()} threads)"
    print(f"\n### CRDLoss step (forward + backward + bank update), B={args.batch}, student {args.student_dim}-d, "
          f"teacher {args.teacher_dim}-d, feat_dim {args.feat_dim}, {args.reps} steps after {args.warmup} warm-up, "
          f"on {where}\n")
    header = ["num_data \\ nce_k", *[str(k) for k in ks], "banks (2 x N x F fp32)"]
    rows = []
    for n in ns:
        cells = []
        for k in ks:
            s = steps[f"N={n},K={k}"]
            clamp = f" [K={s['nce_k_used']}]" if s["nce_k_used"] != k else ""
            cells.append(fmt_stat(s["step"]) + clamp)
        rows.append([f"{n:,}", *cells, f"{2 * n * args.feat_dim * 4 / 2**20:.1f} MiB"])
    print(table(header, rows))
    print(f"\n### One side's K+1 scores, forward + backward: full bank (CRDLoss) / gather rows, B={args.batch}\n")
    rows = []
    for n in ns:
        cells = []
        for k in ks:
            s = scores[f"N={n},K={k}"]
            cells.append(f"{fmt_stat(s['full'])} / {fmt_stat(s['gather'])} "
                         f"({s['full']['median'] / s['gather']['median']:.1f}x)")
        rows.append([f"{n:,}", *cells])
    print(table(["num_data \\ nce_k", *[str(k) for k in ks]], rows))
    profile_table = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        n, k = ns[-1], min(ks[-1], ns[-1] - 1)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            crd_step_times(n, k, argparse_copy(args, warmup=1, reps=10), dev)
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        profile_table = prof.key_averages().table(sort_by=sort, row_limit=15)
        print(f"\n### torch.profiler, CRDLoss step at N={n}, K={k} (12 steps)\n\n{profile_table}")
    write_result(NAME, args, {"steps": steps, "scores": scores, "profile": profile_table}, mach)


def argparse_copy(args, **changes):
    import argparse

    return argparse.Namespace(**{**vars(args), **changes})


if __name__ == "__main__":
    main()
