"""Parameters sized by the first batch (nn.LazyLinear, nn.LazyConv2d) under DDP, whatever launched it.

A distiller's CRD embeddings and spatial adapters learn the student's width from the first batch, so
no launcher has to probe widths before the Runner wraps the model. DDP refuses uninitialised
parameters, so it is told to ignore them (`DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`,
torch's own hook for this) and `LazyParamSync` does for them what DDP would: once the first forward
has sized them, every rank takes rank 0's initial values, and each backward averages their gradients
over ranks (a post-accumulate hook, so gradient accumulation stays exact: the part already averaged
is the same on every rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parameter import UninitializedParameter


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _average_grad(param: torch.Tensor) -> None:
    if param.grad is not None:
        dist.all_reduce(param.grad)
        param.grad.div_(dist.get_world_size())


class LazyParamSync:
    """Keeps `module`'s lazily sized parameters out of DDP and in step across ranks."""

    def __init__(self, module: nn.Module) -> None:
        self.names = [n for n, p in module.named_parameters() if isinstance(p, UninitializedParameter)]
        self.synced = not self.names
        if self.names:
            ignored = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                module, ignored + [n for n in self.names if n not in ignored])

    def after_forward(self, module: nn.Module) -> None:
        """Call after each training forward: the first one that has sized them all syncs them (every
        rank reaches it at the same step, since all ranks run the same forward)."""
        if self.synced:
            return
        params = dict(module.named_parameters())
        if any(isinstance(params[n], UninitializedParameter) for n in self.names):
            return
        self.synced = True
        if not _distributed():
            return
        for name in self.names:
            param = params[name]
            with torch.no_grad():
                dist.broadcast(param.data, src=0)
            param.register_post_accumulate_grad_hook(_average_grad)
