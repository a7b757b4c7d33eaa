"""How fast the `bevcache` command starts: `--help`, `info STORE` and `verify STORE` through the
console script's light start (neither torch nor mmdet3d imported), side by side with what they
cost before (the package import that registers every component: `python -m bevcache.cli`) and with
`import torch` alone. Wall time and peak RSS per command, each run as its own process.
Goals (issue 19): `--help` <= 1 s and `info` <= 2 s wall on 2 cores.

    .venv/bin/python benchmarks/bench_startup.py            # full (alone on the machine)
    .venv/bin/python benchmarks/bench_startup.py --quick    # smoke test
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import PY, REPO, fmt_bytes, machine, parser, stats, table, warn_if_busy, write_result

NAME = "startup"
# Peak RSS of the child (VmHWM: getrusage's maxrss would report this parent's peak after exec).
RSS_WRAPPER = ("import runpy, sys; sys.argv = sys.argv[1:]; "
               "import atexit; atexit.register(lambda: print('VMHWM', next(l.split()[1] for l in "
               "open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr)); "
               "__import__(sys.argv[0][1:]) if sys.argv[0].startswith('=') else "
               "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")


def _store(work: Path, rows: int) -> str:
    from bevcache.store import LayerSpec, create_store

    url = str(work / f"startup-{rows}.zarr")
    if Path(url).exists():
        return url
    store = create_store(url, num_samples=rows, layers=[LayerSpec("pts_neck", 512, "avg")], dtype="float16",
                         tokens=[f"{i:032x}" for i in range(rows)], sample_idx=list(range(rows)), metadata={},
                         chunk_rows=256)
    rng = np.random.default_rng(0)
    for start in range(0, rows, 256):
        stop = min(start + 256, rows)
        store.write_block(start, {"pts_neck": rng.random((stop - start, 512), dtype=np.float32)})
    return url


def _timed(module: str, args: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run([PY, "-c", RSS_WRAPPER, module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{module} {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    kib = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("VMHWM")))
    return wall, kib * 1024


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    warn_if_busy()
    record = machine()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = _store(work, 1000 if args.quick else 28130)  # nuScenes train's row count
    repeats = 2 if args.quick else 7
    cases = [
        ("bevcache --help", "bevcache_cli", ["--help"]),
        ("bevcache info STORE", "bevcache_cli", ["info", store]),
        ("bevcache verify STORE", "bevcache_cli", ["verify", store]),
        ("before: -m bevcache.cli --help", "bevcache.cli", ["--help"]),
        ("before: -m bevcache.cli info STORE", "bevcache.cli", ["info", store]),
        ("python -c 'import torch'", "=torch", []),  # the import alone
    ]
    walls: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    rss: dict[str, int] = {}
    for _name, module, cmd in cases:  # one warm-up each (page cache), then rounds interleaved below
        _timed(module, cmd)
    for _ in range(repeats):
        for name, module, cmd in cases:
            wall, peak = _timed(module, cmd)
            walls[name].append(wall)
            rss[name] = max(rss.get(name, 0), peak)
    rows = [[name, f"{stats(walls[name])['median']:.2f} s", fmt_bytes(rss[name])] for name, _, _ in cases]
    print(table(["command", "wall (median)", "peak RSS"], rows))
    result = {"store_rows": 28130 if not args.quick else 1000, "repeats": repeats,
              "commands": {name: {"wall_s": stats(walls[name]), "peak_rss_bytes": rss[name]} for name, _, _ in cases},
              "goals": {"help_s": 1.0, "info_s": 2.0},
              "met": {"help": stats(walls["bevcache --help"])["median"] <= 1.0,
                      "info": stats(walls["bevcache info STORE"])["median"] <= 2.0}}
    write_result(NAME, args, result, record)


if __name__ == "__main__":
    main()
