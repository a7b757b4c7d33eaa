"""The feature store at 1k, 28k (nuScenes train) and 200k rows x 512 float16: size and read paths.

For each row count, a store is written with `bevcache.store.create_store` / `write_block` (block
by block, as `bevcache extract` does) from realistic values: non-negative, smooth, correlated
features like a pooled ReLU/BN neck output (softplus of a low-rank signal plus noise), with
32-hex-character tokens like nuScenes'. Then:
  - bytes per sample on disk (all arrays; features alone) vs raw float16, and the write time;
  - open + `read_table` of the whole layer (what `bevcache train` does once at start);
  - random-batch (64 rows) lookup latency from the in-memory table (what each training step does)
    and straight from the store with `read_rows` (what a table-free design would do per step).
Reads hit the OS page cache (the store was just written); a cold disk only adds to read_table.

    .venv/bin/python benchmarks/bench_store.py            # full (alone on the machine)
    .venv/bin/python benchmarks/bench_store.py --quick    # smoke test
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from common import (
    fmt_bytes,
    fmt_stat,
    fmt_time,
    machine,
    parser,
    stats,
    table,
    time_repeated,
    warn_if_busy,
    write_result,
)

NAME = "store"
LAYER = "pts_neck"


class Features:
    """Deterministic realistic rows: softplus(Z @ W + b + 0.3 * noise), Z ~ N(0, I_rank)."""

    def __init__(self, dim: int, rank: int = 16, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.w = (rng.standard_normal((rank, dim)) / np.sqrt(rank)).astype(np.float32)
        self.b = rng.normal(-0.5, 0.5, dim).astype(np.float32)  # some channels mostly ~0 (dead ReLUs)
        self.seed, self.rank, self.dim = seed, rank, dim

    def block(self, start: int, stop: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, start))
        z = rng.standard_normal((stop - start, self.rank)).astype(np.float32)
        x = z @ self.w + self.b + 0.3 * rng.standard_normal((stop - start, self.dim)).astype(np.float32)
        return np.logaddexp(0, x).astype(np.float32)  # softplus: >= 0, smooth


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write(url: Path, n: int, dim: int, chunk_rows: int) -> dict:
    from bevcache.store import LayerSpec, create_store, fingerprint_tokens

    if url.exists():
        shutil.rmtree(url)
    tokens = [uuid.UUID(int=int(i) + 1, version=4).hex for i in range(n)]
    feats = Features(dim)
    t0 = time.perf_counter()
    store = create_store(str(url), num_samples=n, layers=[LayerSpec(LAYER, dim, "avg")], dtype="float16",
                         tokens=tokens, sample_idx=list(range(n)), chunk_rows=chunk_rows,
                         metadata={"dataset": fingerprint_tokens(tokens), "bench": True})
    t_create = time.perf_counter() - t0
    block_times = []
    for start, stop in store.blocks():
        value = feats.block(start, stop)  # generated outside the timing
        t = time.perf_counter()
        store.write_block(start, {LAYER: value})
        block_times.append(time.perf_counter() - t)
    info = store.info()
    raw = n * dim * 2
    features = _dir_bytes(url / "features")
    return {"create_seconds": t_create, "write_seconds": sum(block_times), "block_write": stats(block_times),
            "rows_per_second_written": n / sum(block_times), "bytes_on_disk": info["bytes_on_disk"],
            "feature_bytes_on_disk": features, "raw_feature_bytes": raw,
            "bytes_per_sample_on_disk": info["bytes_on_disk"] / n, "feature_bytes_per_sample_on_disk": features / n,
            "raw_bytes_per_sample": raw / n, "feature_compression_ratio": raw / features,
            "info_compression_ratio": info["compression_ratio"]}


def reads(url: Path, n: int, args) -> dict:
    import torch

    from bevcache.store import open_store

    def open_and_read():
        return open_store(str(url)).read_table(LAYER)

    t_read = time_repeated(open_and_read, warmup=1, repeats=args.table_reps)
    table_ = open_and_read()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table_dev = table_.to(device)
    gen = torch.Generator().manual_seed(0)
    idx_cpu = [torch.randint(0, n, (args.batch,), generator=gen) for _ in range(args.lookup_reps + 10)]
    idx_dev = [i.to(device) for i in idx_cpu]
    it = iter(idx_dev)
    t_mem = time_repeated(lambda: table_dev[next(it)], warmup=10, repeats=args.lookup_reps)
    store = open_store(str(url))
    rng = np.random.default_rng(0)
    rows = [np.sort(rng.choice(n, args.batch, replace=False)) for _ in range(args.store_reps + 2)]
    it2 = iter(rows)
    t_store = time_repeated(lambda: store.read_rows(LAYER, next(it2)), warmup=2, repeats=args.store_reps)
    check = store.read_rows(LAYER, rows[0])
    assert np.allclose(check.astype(np.float32), table_[torch.as_tensor(rows[0])].numpy()), "read paths disagree"
    return {"open_read_table": stats(t_read), "table_bytes_in_memory": table_.numel() * table_.element_size(),
            "table_dtype": str(table_.dtype), "lookup_in_memory": stats(t_mem), "lookup_device": str(device),
            "lookup_read_rows": stats(t_store)}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", default="1000,28130,200000", help="Row counts (28130 = nuScenes train).")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk-rows", type=int, default=256, help="(bevcache's default)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--table-reps", type=int, default=5)
    p.add_argument("--lookup-reps", type=int, default=2000)
    p.add_argument("--store-reps", type=int, default=50)
    p.add_argument("--keep", action="store_true", help="Keep the stores (they are deleted after measuring).")
    args = p.parse_args()
    if args.quick:
        args.rows, args.table_reps, args.lookup_reps, args.store_reps = "1000,3000", 2, 200, 5
    warn_if_busy()
    mach = machine()
    work = Path(args.work) / ("quick" if args.quick else "") / "stores"
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(x) for x in args.rows.split(",") if x]
    result = {}
    for n in sizes:
        url = work / f"rows{n}.zarr"
        print(f"[bench] {n} rows x {args.dim}: writing ...", flush=True)
        w = write(url, n, args.dim, args.chunk_rows)
        print(f"[bench] {n} rows: {fmt_bytes(w['bytes_on_disk'])} on disk in {w['write_seconds']:.1f} s; reading ...",
              flush=True)
        r = reads(url, n, args)
        result[str(n)] = {**w, **r}
        if not args.keep:
            shutil.rmtree(url)

    first = result[str(sizes[0])]
    rows = []
    for n in sizes:
        r = result[str(n)]
        rows.append([f"{n:,}", f"{r['raw_bytes_per_sample']:.0f}", f"{r['feature_bytes_per_sample_on_disk']:.0f}",
                     f"{r['bytes_per_sample_on_disk']:.0f}", f"{r['feature_compression_ratio']:.2f}x",
                     fmt_bytes(r["bytes_on_disk"]), f"{r['rows_per_second_written']:,.0f}",
                     fmt_stat(r["open_read_table"]), fmt_bytes(r["table_bytes_in_memory"]),
                     fmt_stat(r["lookup_in_memory"]), fmt_stat(r["lookup_read_rows"])])
    print(f"\n### Store, dim {args.dim} float16, chunks of {args.chunk_rows} rows, Blosc zstd-5 bitshuffle + CRC32C\n")
    print(table(["rows", "raw B/sample", "features B/sample on disk", "all arrays B/sample", "compression",
                 "store size", "rows/s written", "open + read_table", f"table in memory ({first['table_dtype']})",
                 f"batch {args.batch} from table ({first['lookup_device']})", f"batch {args.batch} read_rows"], rows))
    print("\nGrowth relative to the smallest store:")
    growth = [[f"{n:,}", f"{n / sizes[0]:.0f}x",
               f"{result[str(n)]['bytes_on_disk'] / first['bytes_on_disk']:.1f}x",
               f"{result[str(n)]['open_read_table']['median'] / first['open_read_table']['median']:.1f}x",
               f"{result[str(n)]['lookup_in_memory']['median'] / first['lookup_in_memory']['median']:.2f}x",
               f"{result[str(n)]['lookup_read_rows']['median'] / first['lookup_read_rows']['median']:.2f}x"] for n in sizes]
    print(table(["rows", "rows", "size on disk", "open + read_table", "lookup from table", "lookup read_rows"], growth))
    big = result[str(sizes[-1])]
    print(f"\n- a training step's lookup from the table costs {fmt_time(big['lookup_in_memory']['median'])}; "
          f"read_rows straight from the store {fmt_time(big['lookup_read_rows']['median'])} "
          f"({big['lookup_read_rows']['median'] / big['lookup_in_memory']['median']:.0f}x) at {sizes[-1]:,} rows")
    write_result(NAME, args, {"sizes": result, "cpu_count": os.cpu_count()}, mach)


if __name__ == "__main__":
    main()
