"""`bevcache.crd.CRDLoss` step time (forward + backward + memory-bank update) vs nce_k and num_data.

B=4 samples, student 256-d, teacher 512-d, feat_dim 128 (bevcache's defaults), training mode (the
banks and Z update every step). nce_k above num_data - 1 is clamped as `bevcache train` clamps it.
Two ways to the same loss and gradients, timed interleaved step by step:
  - "new" (what CRDLoss does): scores without grad, a few thousand bank rows at a time, and the
    gradient w.r.t. the embeddings computed in the forward (`CRDLoss._loss`);
  - "old" (`CRDLoss._loss_autograd`): autograd through bank[contrast], a [B, K+1, F] copy of the
    rows per side kept for the backward (CRDLoss before issue 20).
Then, at the largest num_data:
  - where a step's time goes, piece by piece (the pieces of CRDLoss.forward, timed in order);
  - one side's K+1 scores without grad: all N bank rows scored then K+1 kept ("full bank"), the
    B*(K+1) rows gathered at once, or gathered a few thousand at a time (`_bank_scores`);
  - the cost of a fresh [B, K+1, F] float32 tensor (allocate + fill) against refilling one
    already allocated: above glibc's mmap threshold (32 MiB) every fresh one is page-faulted in.
The 1-minute load average is recorded with every configuration (the machine's other jobs).

    .venv/bin/python benchmarks/bench_crd.py            # full (alone on the machine)
    .venv/bin/python benchmarks/bench_crd.py --quick    # smoke test
"""

from __future__ import annotations

import os
import time

from common import (
    device,
    fmt_stat,
    fmt_time,
    machine,
    parser,
    stats,
    sync,
    table,
    time_repeated,
    warn_if_busy,
    write_result,
)

NAME = "crd"
PIECES = ["embed", "negatives", "scores", "exp, Z, NCE loss", "gradient rows", "bank update", "backward"]


def make_crd(num_data: int, nce_k: int, args, dev, how: str):
    import torch

    from bevcache.crd import CRDLoss

    torch.manual_seed(0)
    crd = CRDLoss(student_dim=args.student_dim, teacher_dim=args.teacher_dim, num_data=num_data,
                  feat_dim=args.feat_dim, nce_k=nce_k).to(dev).train()
    if how == "old":
        crd._loss = crd._loss_autograd
    return crd


def inputs(num_data: int, steps: int, args, dev):
    import torch

    f_s = torch.randn(args.batch, args.student_dim, device=dev, requires_grad=True)  # stands in for the student
    f_t = torch.rand(args.batch, args.teacher_dim, device=dev)  # cached teacher rows (non-negative)
    gen = torch.Generator().manual_seed(1)
    indices = [torch.randperm(num_data, generator=gen)[: args.batch].to(dev) for _ in range(steps)]
    return f_s, f_t, indices


def step_times(num_data: int, nce_k: int, args, dev, hows=("new", "old")) -> dict[str, list[float]]:
    """Seconds per CRD step for each way, the ways interleaved step by step."""
    crds = {how: make_crd(num_data, nce_k, args, dev, how) for how in hows}
    f_s, f_t, indices = inputs(num_data, args.warmup + args.reps, args, dev)
    times: dict[str, list[float]] = {how: [] for how in hows}
    for i, index in enumerate(indices):
        for how, crd in crds.items():
            t0 = time.perf_counter()
            crd.zero_grad(set_to_none=True)
            f_s.grad = None
            crd(f_s, f_t, index).backward()
            sync()
            if i >= args.warmup:
                times[how].append(time.perf_counter() - t0)
    return times


def piece_times(num_data: int, nce_k: int, args, dev, how: str) -> dict[str, list[float]]:
    """Seconds per piece of a CRD step: CRDLoss.forward's body, written out and timed in order."""
    import torch
    import torch.nn.functional as F

    from bevcache.crd import _bank_scores

    crd = make_crd(num_data, nce_k, args, dev, how)
    f_s, f_t, indices = inputs(num_data, args.warmup + args.reps, args, dev)
    times: dict[str, list[float]] = {piece: [] for piece in PIECES}
    marks: list[float] = []  # the clock at the start and at the end of each piece

    def mark():
        sync()
        marks.append(time.perf_counter())

    for i, index in enumerate(indices):
        crd.zero_grad(set_to_none=True)
        f_s.grad = None
        marks.clear()
        mark()
        e_s = F.normalize(crd.embed_s(f_s), dim=1)  # [B, F]
        e_t = F.normalize(crd.embed_t(f_t), dim=1)  # [B, F]
        mark()
        contrast = crd._contrast_indices(index)  # [B, K+1]
        mark()
        if how == "new":
            x_s = _bank_scores(e_s.detach(), crd.memory_t, contrast) / crd.nce_t  # [B, K+1]
            x_t = _bank_scores(e_t.detach(), crd.memory_s, contrast) / crd.nce_t
            mark()
            scores_s, scores_t = torch.exp(x_s), torch.exp(x_t)
            z_s, z_t = crd._normalisers(scores_s, scores_t)
            p_s, p_t = scores_s / z_s, scores_t / z_t
            loss = crd._nce_loss(p_s) + crd._nce_loss(p_t)
            mark()
            for e, bank, p in ((e_s, crd.memory_t, p_s), (e_t, crd.memory_s, p_t)):
                weight = crd._nce_loss_grad(p) / crd.nce_t
                grad = F.embedding_bag(contrast, bank, per_sample_weights=weight, mode="sum")  # [B, F]
                loss = loss + ((e - e.detach()) * grad).sum()
            mark()
        else:
            x_s = torch.einsum("bkf,bf->bk", crd.memory_t[contrast], e_s) / crd.nce_t  # [B, K+1]
            x_t = torch.einsum("bkf,bf->bk", crd.memory_s[contrast], e_t) / crd.nce_t
            mark()
            scores_s, scores_t = torch.exp(x_s), torch.exp(x_t)
            z_s, z_t = crd._normalisers(scores_s.detach(), scores_t.detach())
            loss = crd._nce_loss(scores_s / z_s) + crd._nce_loss(scores_t / z_t)
            mark()
            mark()  # no gradient rows: autograd reads the kept copy in the backward
        crd._update_banks(e_s.detach(), e_t.detach(), index)
        crd.step += 1
        mark()
        loss.backward()
        mark()
        if i >= args.warmup:
            for piece, t0, t1 in zip(PIECES, marks[:-1], marks[1:], strict=True):
                times[piece].append(t1 - t0)
    return times


def score_times(num_data: int, nce_k: int, args, dev) -> dict[str, list[float]]:
    """One side's [B, K+1] scores without grad: full bank / all rows gathered at once / in chunks."""
    import torch
    import torch.nn.functional as F

    import bevcache.crd as crd_module

    torch.manual_seed(0)
    bank = F.normalize(torch.randn(num_data, args.feat_dim, device=dev), dim=1)  # [N, F]
    emb = F.normalize(torch.randn(args.batch, args.feat_dim, device=dev), dim=1)  # [B, F]
    contrast = torch.randint(0, num_data, (args.batch, nce_k + 1), device=dev)  # [B, K+1]
    ways = {
        "full bank": lambda: (emb @ bank.T).gather(1, contrast),
        "gather at once": lambda: torch.einsum("bkf,bf->bk", bank[contrast], emb),
        f"gather {crd_module._ROWS_AT_ONCE} rows at a time": lambda: crd_module._bank_scores(emb, bank, contrast),
    }
    if dev.type == "cpu" and contrast.numel() >= num_data:  # _bank_scores takes the full bank there
        ways.pop(f"gather {crd_module._ROWS_AT_ONCE} rows at a time")
    with torch.no_grad():
        return {way: time_repeated(fn, warmup=args.warmup, repeats=args.reps) for way, fn in ways.items()}


def fresh_memory_times(nce_k: int, args, dev) -> dict[str, list[float]]:
    """Allocate + fill a [B, K+1, F] float32 tensor, against refilling one allocated once."""
    import torch

    shape = (args.batch, nce_k + 1, args.feat_dim)
    kept = torch.empty(shape, device=dev)
    return {"fresh": time_repeated(lambda: torch.empty(shape, device=dev).fill_(1.0), warmup=args.warmup, repeats=args.reps),
            "reused": time_repeated(lambda: kept.fill_(1.0), warmup=args.warmup, repeats=args.reps)}


def median_ms(xs: list[float]) -> str:
    return fmt_time(stats(xs)["median"])


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
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads [default: torch's].")
    p.add_argument("--profile", action="store_true", help="torch.profiler op table of the largest configuration.")
    args = p.parse_args()
    if args.quick:
        args.nce_k, args.num_data, args.warmup, args.reps = "1024,4096", "5000,28130", 2, 5
    warn_if_busy()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    mach = machine()
    dev = device()
    ks = [int(x) for x in args.nce_k.split(",") if x]
    ns = [int(x) for x in args.num_data.split(",") if x]

    steps = {}
    for n in ns:
        for k in ks:
            eff = min(k, n - 1)
            key = f"N={n},K={k}"
            load = os.getloadavg()[0]
            times = step_times(n, eff, args, dev)
            steps[key] = {"num_data": n, "nce_k": k, "nce_k_used": eff, "loadavg_1min": load,
                          **{how: stats(ts) for how, ts in times.items()},
                          "bank_bytes": 2 * n * args.feat_dim * 4}
            print(f"[bench] {key}: new {fmt_stat(steps[key]['new'])}, old {fmt_stat(steps[key]['old'])} "
                  f"(load {load:.2f})", flush=True)

    n_big = ns[-1]
    pieces, scores, fresh = {}, {}, {}
    for k in ks:
        eff = min(k, n_big - 1)
        key = f"N={n_big},K={k}"
        load = os.getloadavg()[0]
        pieces[key] = {how: {piece: stats(ts) for piece, ts in piece_times(n_big, eff, args, dev, how).items()}
                       for how in ("new", "old")}
        pieces[key]["loadavg_1min"] = load
        scores[key] = {way: stats(ts) for way, ts in score_times(n_big, eff, args, dev).items()}
        scores[key]["loadavg_1min"] = load
        fresh[f"K={k}"] = {"bytes": args.batch * (eff + 1) * args.feat_dim * 4,
                           **{how: stats(ts) for how, ts in fresh_memory_times(eff, args, dev).items()}}
        print(f"[bench] {key}: pieces, scores, fresh memory done (load {load:.2f})", flush=True)

    where = mach["cuda"]["device"] if mach["cuda"] else f"CPU {mach['cpu_model']} ({torch.get_num_threads()} threads)"
    print(f"\n### CRDLoss step (forward + backward + bank update), new / old, B={args.batch}, student "
          f"{args.student_dim}-d, teacher {args.teacher_dim}-d, feat_dim {args.feat_dim}, {args.reps} steps each "
          f"after {args.warmup} warm-up, interleaved, on {where}\n")
    rows = []
    for n in ns:
        cells = []
        for k in ks:
            s = steps[f"N={n},K={k}"]
            clamp = f" [K={s['nce_k_used']}]" if s["nce_k_used"] != k else ""
            cells.append(f"{fmt_stat(s['new'])} / {fmt_stat(s['old'])}{clamp}")
        load = max(steps[f"N={n},K={k}"]["loadavg_1min"] for k in ks)
        rows.append([f"{n:,}", *cells, f"{2 * n * args.feat_dim * 4 / 2**20:.1f} MiB", f"{load:.2f}"])
    print(table(["num_data \\ nce_k", *[str(k) for k in ks], "banks (2 x N x F fp32)", "load (max)"], rows))
    ratios = {}
    if len(ks) > 1:
        lo, hi = f"N={n_big},K={ks[0]}", f"N={n_big},K={ks[-1]}"
        ratios = {how: steps[hi][how]["median"] / steps[lo][how]["median"] for how in ("new", "old")}
        print(f"\nnce_k {ks[-1]} / nce_k {ks[0]} at num_data {n_big:,} (medians): new {ratios['new']:.1f}x, "
              f"old {ratios['old']:.1f}x; new / old at nce_k {ks[-1]}: "
              f"{steps[hi]['new']['median'] / steps[hi]['old']['median']:.3f}")

    print(f"\n### Where a step's time goes at num_data {n_big:,}: median per piece, new / old\n")
    rows = [[piece, *[f"{fmt_time(pieces[f'N={n_big},K={k}']['new'][piece]['median'])} / "
                      f"{fmt_time(pieces[f'N={n_big},K={k}']['old'][piece]['median'])}" for k in ks]]
            for piece in PIECES]
    print(table(["piece \\ nce_k", *[str(k) for k in ks]], rows))
    print("\n(scores: new = `_bank_scores` without grad, old = bank[contrast] + einsum with grad; gradient rows: "
          "new only, the embedding_bag weighted sums; backward: old reads the kept [B, K+1, F] copies.)")

    print(f"\n### One side's K+1 scores without grad at num_data {n_big:,}, B={args.batch}\n")
    ways = sorted({way for s in scores.values() for way in s if way != "loadavg_1min"}, key=len)
    rows = [[way, *[fmt_stat(scores[f"N={n_big},K={k}"][way]) if way in scores[f"N={n_big},K={k}"] else "-"
                    for k in ks]] for way in ways]
    print(table(["way \\ nce_k", *[str(k) for k in ks]], rows))

    print(f"\n### A [B={args.batch}, K+1, {args.feat_dim}] float32 tensor: allocate + fill / refill one kept\n")
    rows = [[f"{k}", f"{fresh[f'K={k}']['bytes'] / 2**20:.1f} MiB", fmt_stat(fresh[f"K={k}"]["fresh"]),
             fmt_stat(fresh[f"K={k}"]["reused"])] for k in ks]
    print(table(["nce_k", "size", "fresh", "reused"], rows))

    profile_table = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        n, k = ns[-1], min(ks[-1], ns[-1] - 1)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            step_times(n, k, argparse_copy(args, warmup=1, reps=10), dev, hows=("new",))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        profile_table = prof.key_averages().table(sort_by=sort, row_limit=15)
        print(f"\n### torch.profiler, CRDLoss step at N={n}, K={k} (11 steps)\n\n{profile_table}")
    import bevcache.crd

    write_result(NAME, args, {"crd_module": bevcache.crd.__file__, "steps": steps, "ratio_largest_over_smallest_nce_k": ratios, "pieces": pieces,
                              "scores": scores, "fresh_memory": fresh, "profile": profile_table}, mach)


def argparse_copy(args, **changes):
    import argparse

    return argparse.Namespace(**{**vars(args), **changes})


if __name__ == "__main__":
    main()
