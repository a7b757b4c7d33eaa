"""Capture named layers with forward hooks and pool their outputs to one vector per sample.

Used by both stages: `extract` pools the teacher, the distiller pools the student the same way,
so a cached teacher row and a live student row are made by the same function.

Pooling of one output (B = batch):
  [B, C]            -> as is
  [B, N, C]         -> over N (point/query features, channels last)
  [B, C, H, W]      -> over H, W
  [B, C, D, H, W]   -> over D, H, W
  list/tuple/dict   -> pool each tensor leaf (dict keys in sorted order, recursively), then
                       concatenate along channels: multi-scale necks and heads give one vector.
Non-tensor leaves (None, ints, metadata) are skipped. `spatial_map` keeps a BEV map instead,
pooled to a fixed grid, for spatial distillation.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, LayerError

POOLINGS = ("avg", "max", "avgmax")


def _pool_tensor(t: Tensor, pooling: str) -> Tensor:
    if t.dim() == 2:  # [B, C]
        return t if pooling != "avgmax" else torch.cat([t, t], dim=1)
    if t.dim() == 3:  # [B, N, C]
        dims: tuple[int, ...] = (1,)
    elif t.dim() in (4, 5):  # [B, C, H, W] / [B, C, D, H, W]
        dims = tuple(range(2, t.dim()))
    else:
        raise LayerError(f"cannot pool a tensor of shape {tuple(t.shape)}: expected 2 to 5 dimensions")
    if pooling == "avg":
        return t.mean(dim=dims)
    if pooling == "max":
        return t.amax(dim=dims)
    return torch.cat([t.mean(dim=dims), t.amax(dim=dims)], dim=1)


def _tensor_leaves(output: Any) -> Iterable[Tensor]:
    if isinstance(output, Tensor):
        yield output
    elif isinstance(output, Mapping):
        for key in sorted(output, key=str):
            yield from _tensor_leaves(output[key])
    elif isinstance(output, (list, tuple)):
        for item in output:
            yield from _tensor_leaves(item)


def pool_output(output: Any, pooling: str = "avg", batch_size: int | None = None) -> Tensor:
    """Pool a module output (tensor or nested list/tuple/dict of tensors) to [B, D]."""
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {list(POOLINGS)}. Got {pooling!r}.")
    leaves = [t for t in _tensor_leaves(output) if t.dim() >= 2 and t.is_floating_point()]
    if batch_size is not None:
        leaves = [t for t in leaves if t.shape[0] == batch_size]
    if not leaves:
        raise LayerError("the layer output holds no floating tensor with a batch dimension to pool")
    return torch.cat([_pool_tensor(t, pooling) for t in leaves], dim=1)


def first_map(output: Any, batch_size: int | None = None) -> Tensor:
    """A layer's BEV map [B, C, H, W]: a list/tuple/dict output gives its first such tensor, as
    multi-scale necks put their finest map first (SECONDFPN's `pts_neck` is a list of one map)."""
    maps = [t for t in _tensor_leaves(output) if t.dim() == 4 and t.is_floating_point()
            and (batch_size is None or t.shape[0] == batch_size)]
    if not maps:
        raise LayerError("the layer output holds no [B, C, H, W] map to keep spatially; cache it pooled only, "
                         "or choose a BEV layer such as 'pts_neck'")
    return maps[0]


def spatial_map(output: Any, grid: tuple[int, int], batch_size: int | None = None) -> Tensor:
    """A layer's BEV map (`first_map`) adaptive-average-pooled to `grid` (h, w): [B, C, h, w]."""
    return F.adaptive_avg_pool2d(first_map(output, batch_size), (int(grid[0]), int(grid[1])))


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """Find a submodule by dotted path, or raise LayerError listing what exists."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        top = sorted({n.split(".")[0] for n in names})
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f" Close matches: {close}." if close else ""
        raise LayerError(
            f"layer {name!r} is not a module of {type(model).__name__}.{hint} "
            f"Top-level modules: {top}. Use a dotted path such as 'pts_backbone.blocks.0'."
        ) from None


class _AllCaptured(Exception):
    """Raised from a hook to skip the rest of a forward once every requested layer fired."""


class LayerRecorder:
    """Forward hooks on named modules; records each layer's latest raw output.

    With `stop_early=True` (extraction), the forward is cut short as soon as every layer has
    fired, so the teacher never runs its head or box decoding when only the neck is cached.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str], *, stop_early: bool = False):
        self.layers = list(dict.fromkeys(layers))
        self.stop_early = stop_early
        self.outputs: dict[str, Any] = {}
        self._handles = [
            resolve_module(model, name).register_forward_hook(self._hook(name)) for name in self.layers
        ]

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.outputs[name] = output
            if self.stop_early and all(n in self.outputs for n in self.layers):
                raise _AllCaptured

        return hook

    def run(self, fn, *args, **kwargs) -> Any:
        """Call fn (a forward) after clearing the records; swallows the early stop."""
        self.outputs.clear()
        try:
            return fn(*args, **kwargs)
        except _AllCaptured:
            return None

    def pooled(self, pooling: str | Mapping[str, str], batch_size: int) -> dict[str, Tensor]:
        """Pool every recorded layer to [B, D]; a layer that never fired is an error."""
        missing = [n for n in self.layers if n not in self.outputs]
        if missing:
            raise LayerError(
                f"layer(s) {missing} produced no output in the forward pass (the model never calls "
                "them on this path, e.g. BEVFusion's pts_voxel_encoder). Choose a layer that runs, "
                "such as 'pts_backbone' or 'pts_neck'."
            )
        result = {}
        for name in self.layers:
            mode = pooling if isinstance(pooling, str) else pooling[name]
            result[name] = pool_output(self.outputs[name], mode, batch_size)
        return result

    def spatial(self, grids: Mapping[str, tuple[int, int]], batch_size: int) -> dict[str, Tensor]:
        """Each named layer's recorded map pooled to its grid: {layer: [B, C, h, w]}."""
        missing = [n for n in grids if n not in self.outputs]
        if missing:
            raise LayerError(f"layer(s) {missing} produced no output in the forward pass; choose a layer that runs.")
        return {name: spatial_map(self.outputs[name], grid, batch_size) for name, grid in grids.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> LayerRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
