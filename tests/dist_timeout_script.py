"""Run by test_reliability under torchrun: rank 1 stalls (alive, silent); rank 0's barrier must give up."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmengine.config import Config  # noqa: E402

from bevcache.runtime import init_distributed  # noqa: E402

init_distributed("pytorch", Config(dict(env_cfg=dict(dist_cfg=dict(backend="gloo", timeout=5)))))
import torch.distributed as dist  # noqa: E402

if dist.get_rank() == 1:
    time.sleep(float(os.environ.get("STALL_S", 60)))
    sys.exit(0)
start = time.time()
try:
    dist.barrier()
except Exception as exc:  # gloo: "Timed out waiting ... for recv operation to complete"
    print(f"rank 0 barrier failed after {time.time() - start:.1f} s: {type(exc).__name__}", flush=True)
    sys.exit(3)
print("rank 0 barrier returned", flush=True)
