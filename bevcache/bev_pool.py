"""BEVFusion's `bev_pool` (the camera lift's BEV pooling) in plain torch, for the CPU and any device.

Same definition and call signature as mmdetection3d's compiled op
(`projects/BEVFusion/bevfusion/ops/bev_pool/bev_pool.py`): `bev_pool(feats, coords, B, D, H, W)`
sums the features of all frustum points that fall in one BEV cell.

- `feats`  `[N, C]` float: one row per frustum point (already filtered to the grid).
- `coords` `[N, 4]` integer: columns (x, y, z, batch) — the order BEVFusion's `BaseViewTransform`
  builds them in; x indexes H, y indexes W, z indexes D.
- returns `[B, C, D, H, W]`: `out[b, :, z, x, y] = sum(feats[i] for i with coords[i] == (x, y, z, b))`,
  zero where no point falls (the CUDA kernel writes `[B, D, H, W, C]` and the wrapper permutes).

The compiled op sorts points by cell and sums each run; here one `index_add` over the flattened
cell index does the same sum without sorting. Its backward (autograd) gathers the output gradient
back to every point, which is what the CUDA backward kernel does. `index_add` is deterministic on
the CPU and, under `torch.use_deterministic_algorithms(True)`, on CUDA too.
"""

from __future__ import annotations

import torch

__all__ = ["bev_pool", "bev_cell_index"]


def bev_cell_index(coords: torch.Tensor, B: int, D: int, H: int, W: int) -> torch.Tensor:
    """Flat index `((b * D + z) * H + x) * W + y` of each point's cell in a `[B, D, H, W]` grid; `[N]` int64.

    Raises ValueError if a coordinate lies outside the grid (the CUDA kernel would write out of bounds).
    """
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError(f"bev_pool coords must be [N, 4] (x, y, z, batch), got {tuple(coords.shape)}")
    if coords.dtype.is_floating_point or coords.dtype == torch.bool:
        raise ValueError(f"bev_pool coords must be integer cell indices, got {coords.dtype}")
    c = coords.long()
    if c.numel():
        # (x < H, y < W, z < D, b < B): one vectorised range check instead of silent wrong cells.
        upper = torch.tensor([H, W, D, B], device=c.device)
        bad = ((c < 0) | (c >= upper)).any(dim=1)
        if bool(bad.any()):
            first = c[bad.nonzero()[0, 0]].tolist()
            raise ValueError(f"bev_pool coords outside the grid (x<{H}, y<{W}, z<{D}, batch<{B}): "
                             f"{int(bad.sum())} points, first (x, y, z, b) = {first}; filter them first")
    return ((c[:, 3] * D + c[:, 2]) * H + c[:, 0]) * W + c[:, 1]


def bev_pool(feats: torch.Tensor, coords: torch.Tensor, B: int, D: int, H: int, W: int) -> torch.Tensor:
    """Sum `feats` `[N, C]` into the cells `coords` `[N, 4]` (x, y, z, b) name; returns `[B, C, D, H, W]`.

    Differentiable in `feats` (not in `coords`). `B, D, H, W` may be ints or 0-d tensors (BEVFusion
    passes its `nx` parameter's entries).
    """
    B, D, H, W = (int(v) for v in (B, D, H, W))
    if feats.dim() != 2 or feats.shape[0] != coords.shape[0]:
        raise ValueError(f"bev_pool feats must be [N, C] with N = len(coords) = {coords.shape[0]}, "
                         f"got {tuple(feats.shape)}")
    cell = bev_cell_index(coords.to(feats.device), B, D, H, W)  # [N]
    out = feats.new_zeros(B * D * H * W, feats.shape[1])
    out = out.index_add(0, cell, feats)  # out-of-place: autograd's backward is index_select (a gather)
    # [B*D*H*W, C] -> [B, D, H, W, C] (the CUDA kernel's layout) -> [B, C, D, H, W] (the op's return).
    return out.view(B, D, H, W, -1).permute(0, 4, 1, 2, 3).contiguous()
