"""Tests-only fault injection: run `bevcache` (or any store writer) and SIGKILL it after N durable blocks.

As a launcher, in place of `python -m bevcache.cli` (also as torchrun's script):

    python tests/fault_injection.py --kill-after-blocks N [--rank R] -- extract --config ... --out ...
    torchrun --nproc-per-node 2 tests/fault_injection.py --kill-after-blocks 1 --rank 1 -- extract ... --launcher pytorch

It installs a bevcache.store write observer, then runs bevcache's CLI unchanged: production code
holds no fault-injection branch. With --rank R only the process whose torchrun RANK is R dies.
Tests build the command with `killed_cmd(N, *args, rank=None)`; in-process, `kill_after_blocks(N)`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path


def kill_after_blocks(n: int, rank: int | None = None):
    """Install a write observer that SIGKILLs this process after its n-th durable block (only on
    torchrun rank `rank` when given); returns the observer."""
    from bevcache.store import add_write_observer

    written = [0]

    def observer(store, start: int) -> None:
        written[0] += 1
        if written[0] == n and (rank is None or os.environ.get("RANK", "0") == str(rank)):
            os.kill(os.getpid(), signal.SIGKILL)

    return add_write_observer(observer)


def killed_cmd(n: int, *args: str, rank: int | None = None) -> list[str]:
    """The command line running `bevcache *args` that dies by SIGKILL after n durable blocks."""
    return [sys.executable, str(Path(__file__).resolve()), "--kill-after-blocks", str(n),
            *(["--rank", str(rank)] if rank is not None else []), "--", *args]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-after-blocks", type=int, required=True)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("bevcache_args", nargs=argparse.REMAINDER)
    opts = parser.parse_args(argv)
    args = opts.bevcache_args[1:] if opts.bevcache_args[:1] == ["--"] else opts.bevcache_args
    kill_after_blocks(opts.kill_after_blocks, opts.rank)
    from bevcache.cli import main as bevcache_main

    bevcache_main(args=args, prog_name="bevcache")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as `python -m bevcache.cli` from the repo root
    main()
