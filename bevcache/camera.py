"""The camera branch's lift to BEV (Lift-Splat-Shoot, as in BEVFusion's `LSSTransform`), on any device.

`LSSViewTransform` (MODELS, mmdet3d scope) turns multi-view image features into a BEV map on the
LiDAR detector's own grid, so it can be fused with (or replace) the LiDAR BEV map:

1. lift: a 1x1 `depthnet` predicts, per feature pixel, a softmax over D depth bins and C context
   channels; their outer product puts `depth[d] * context` at each of the pixel's D frustum points.
2. geometry: frustum point (u, v, d) of camera n -> undo the image augmentation (`img_aug_matrix`,
   BEVFusion's 4x4 in pixel space; identity if absent) -> camera frame (u d, v d, d) through
   inv(cam2img) -> LiDAR frame through inv(lidar2cam) -> augmented LiDAR frame (the same augmentation
   the point cloud got: `lidar_aug_matrix`, or mmdet3d's pcd_* keys via `bevcache.warp.bev_transform`).
3. splat: `bevcache.bev_pool` sums the features of all frustum points in each BEV cell.

Output layout: `[B, C * nz, ny, nx]`, rows along y and columns along x — the layout of mmdet3d's
SparseEncoder / PointPillarsScatter BEV maps and of CenterHead's heatmaps (`heatmap[y, x]`), so a
camera map and a LiDAR map of the same grid line up cell for cell. (BEVFusion's own lift writes
x-major maps because its LiDAR encoder does; ours follows mmdet3d's.)

Pixel convention: feature pixel j covers image pixels [j s, (j+1) s) with s = image / feature size,
its frustum ray goes through the centre (j + 0.5) s - 0.5 (integer pixel coordinates = pixel centres,
as in cam2img).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from mmdet3d.registry import MODELS
from mmengine.model import BaseModule
from torch import Tensor, nn

from .bev_pool import bev_pool
from .errors import ConfigError

__all__ = ["LSSViewTransform", "camera_matrices"]

Bound = Sequence[float]  # (min, max, step)


def _as_4x4(m: Any) -> np.ndarray:
    a = np.asarray(m, dtype=np.float64)
    if a.shape == (4, 4):
        return a
    if a.shape == (3, 3):  # nuScenes v2 infos store cam2img as 3x3 intrinsics
        out = np.eye(4)
        out[:3, :3] = a
        return out
    raise ConfigError(f"a camera matrix must be 3x3 or 4x4, got shape {a.shape}")


def camera_matrices(metas: Sequence[Mapping[str, Any]], num_views: int, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The geometry a lift needs, per sample, from the data samples' metainfo.

    Returns cam2img `[B, N, 4, 4]`, lidar2cam `[B, N, 4, 4]`, img_aug `[B, N, 4, 4]` (identity when a
    sample has no `img_aug_matrix`) and lidar_aug `[B, 4, 4]` (LiDAR frame -> augmented LiDAR frame).
    """
    from .warp import (
        bev_transform,  # the one reader of mmdet3d's and BEVFusion's augmentation records
    )

    out: dict[str, list[np.ndarray]] = {"cam2img": [], "lidar2cam": [], "img_aug": [], "lidar_aug": []}
    for i, meta in enumerate(metas):
        for key in ("cam2img", "lidar2cam"):
            if meta.get(key) is None:
                raise ConfigError(
                    f"sample {i} has no '{key}' in its metainfo: the camera branch needs it. Load the images with "
                    "LoadMultiViewImageFromFiles (it sets cam2img/lidar2cam from the info's images[CAM_*]) and keep "
                    f"'{key}' in Pack3DDetInputs' meta_keys.")
            if len(meta[key]) != num_views:
                raise ConfigError(f"sample {i} has {len(meta[key])} '{key}' matrices for {num_views} images; "
                                  "each image needs its own (check the info's images[CAM_*]).")
        out["cam2img"].append(np.stack([_as_4x4(m) for m in meta["cam2img"]]))
        out["lidar2cam"].append(np.stack([_as_4x4(m) for m in meta["lidar2cam"]]))
        img_aug = meta.get("img_aug_matrix")
        out["img_aug"].append(np.stack([_as_4x4(m) for m in img_aug]) if img_aug is not None
                              else np.tile(np.eye(4), (num_views, 1, 1)))
        if meta.get("lidar_aug_matrix") is not None:
            lidar_aug = _as_4x4(meta["lidar_aug_matrix"])  # BEVFusion: full 3D, column vectors
        else:
            # mmdet3d's GlobalRotScaleTrans / RandomFlip3D record pcd_* keys; their BEV (x, y) part as
            # a 4x4 (z is left as is: the grid's z range is loose, a few % of z scale moves nothing).
            a = bev_transform(meta)
            lidar_aug = np.eye(4)
            lidar_aug[:2, :2], lidar_aug[:2, 3] = a[:2, :2], a[:2, 2]
        out["lidar_aug"].append(lidar_aug)
    return {k: torch.as_tensor(np.stack(v), dtype=dtype, device=device) for k, v in out.items()}


@MODELS.register_module()
class LSSViewTransform(BaseModule):
    """Multi-view image features -> BEV map on the LiDAR grid (lift, splat with a torch bev_pool).

    Args:
        in_channels: channels of the image features (the image neck's output).
        out_channels: C, channels of the camera BEV map (times the number of z cells).
        xbound, ybound, zbound: (min, max, cell size) in metres of the BEV grid, LiDAR frame; use the
            LiDAR branch's point_cloud_range with cells of voxel_size * out_size_factor so both maps align.
        dbound: (min, max, step) of the depth bins in metres along the optical axis.
    """

    def __init__(self, in_channels: int, out_channels: int, xbound: Bound, ybound: Bound, zbound: Bound,
                 dbound: Bound, init_cfg: dict | list | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.in_channels, self.C = int(in_channels), int(out_channels)
        bounds = [tuple(float(v) for v in b) for b in (xbound, ybound, zbound)]
        for name, (lo, hi, step) in zip("xyz", bounds, strict=True):
            n = (hi - lo) / step
            if step <= 0 or n < 1 or abs(n - round(n)) > 1e-6:
                raise ConfigError(f"view_transform {name}bound {[lo, hi, step]}: (max - min) must be a positive "
                                  "whole number of cells")
        self.lower = tuple(b[0] for b in bounds)  # (x, y, z) of the grid's corner
        self.cell = tuple(b[2] for b in bounds)
        self.nx, self.ny, self.nz = (int(round((b[1] - b[0]) / b[2])) for b in bounds)
        depths = torch.arange(*[float(v) for v in dbound], dtype=torch.float32)
        if len(depths) == 0 or depths[0] <= 0:
            raise ConfigError(f"view_transform dbound {list(dbound)} must give at least one depth bin > 0 m")
        self.register_buffer("depths", depths, persistent=False)  # [D]
        self.D = len(depths)
        self.depthnet = nn.Conv2d(self.in_channels, self.D + self.C, 1)

    @property
    def bev_shape(self) -> tuple[int, int]:
        """(ny, nx): rows, columns of the output map."""
        return self.ny, self.nx

    def frustum(self, feature_size: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
        """Pixel coordinates and depth of every frustum point: `[D, fH, fW, 3]` as (u, v, d)."""
        (fH, fW), (iH, iW) = feature_size, image_size
        dev = self.depths.device
        u = (torch.arange(fW, device=dev, dtype=torch.float32) + 0.5) * (iW / fW) - 0.5  # pixel centres
        v = (torch.arange(fH, device=dev, dtype=torch.float32) + 0.5) * (iH / fH) - 0.5
        d, vv, uu = torch.meshgrid(self.depths, v, u, indexing="ij")
        return torch.stack((uu, vv, d), -1)

    def geometry(self, frustum: Tensor, cam2img: Tensor, lidar2cam: Tensor, img_aug: Tensor,
                 lidar_aug: Tensor) -> Tensor:
        """Frustum points `[D, fH, fW, 3]` -> augmented LiDAR coordinates `[B, N, D, fH, fW, 3]`.

        cam2img, lidar2cam, img_aug: `[B, N, 4, 4]`; lidar_aug: `[B, 4, 4]`.
        """
        B, N = cam2img.shape[:2]
        pts = frustum.reshape(1, 1, -1, 3)  # [1, 1, P, 3], P = D fH fW
        ones = torch.ones_like(pts[..., :1])
        # Undo the image augmentation in pixel space (BEVFusion's post_rots/post_trans: d unchanged).
        pts = torch.cat((pts, ones.expand_as(pts[..., :1])), -1).expand(B, N, -1, -1)
        pts = pts @ torch.linalg.inv(img_aug).transpose(-1, -2)  # [B, N, P, 4]
        # Pixel + depth -> homogeneous camera-ray point (u d, v d, d, 1) -> LiDAR -> augmented LiDAR.
        depth = pts[..., 2:3]
        pts = torch.cat((pts[..., :2] * depth, depth, torch.ones_like(depth)), -1)
        to_lidar = lidar_aug[:, None] @ torch.linalg.inv(lidar2cam) @ torch.linalg.inv(cam2img)  # [B, N, 4, 4]
        pts = pts @ to_lidar.transpose(-1, -2)
        return pts[..., :3].reshape(B, N, *frustum.shape)

    def lift(self, feats: Tensor) -> Tensor:
        """Image features `[B, N, C_in, fH, fW]` -> frustum features `[B, N, D, fH, fW, C]`."""
        B, N, C_in, fH, fW = feats.shape
        if C_in != self.in_channels:
            raise ConfigError(f"view_transform in_channels={self.in_channels} but the image neck gives {C_in} "
                              "channels; make them equal in the config")
        x = self.depthnet(feats.reshape(B * N, C_in, fH, fW))  # [BN, D + C, fH, fW]
        depth = x[:, :self.D].softmax(dim=1)
        x = depth.unsqueeze(1) * x[:, self.D:].unsqueeze(2)  # [BN, C, D, fH, fW]
        return x.view(B, N, self.C, self.D, fH, fW).permute(0, 1, 3, 4, 5, 2)

    def splat(self, geom: Tensor, x: Tensor) -> Tensor:
        """Frustum features `[B, N, D, fH, fW, C]` at points `geom` `[..., 3]` -> BEV `[B, C * nz, ny, nx]`."""
        B, C = x.shape[0], x.shape[-1]
        lower = geom.new_tensor(self.lower)
        cell = geom.new_tensor(self.cell)
        idx = ((geom - lower) / cell).floor().long().reshape(B, -1, 3)  # [B, P', 3] (ix, iy, iz)
        batch = torch.arange(B, device=idx.device).view(B, 1, 1).expand(-1, idx.shape[1], 1)
        idx = torch.cat((idx, batch), -1).reshape(-1, 4)
        kept = ((idx[:, 0] >= 0) & (idx[:, 0] < self.nx) & (idx[:, 1] >= 0) & (idx[:, 1] < self.ny)
                & (idx[:, 2] >= 0) & (idx[:, 2] < self.nz))
        idx, feats = idx[kept], x.reshape(-1, C)[kept]
        # bev_pool's (x, y, z, b) columns name the H and W axes: pass (iy, ix) so rows run along y.
        coords = idx[:, [1, 0, 2, 3]]
        bev = bev_pool(feats, coords, B, self.nz, self.ny, self.nx)  # [B, C, nz, ny, nx]
        return bev.flatten(1, 2)  # z cells stacked into channels, as BEVFusion does

    def forward(self, feats: Tensor, image_size: tuple[int, int], cam2img: Tensor, lidar2cam: Tensor,
                img_aug: Tensor | None = None, lidar_aug: Tensor | None = None) -> Tensor:
        """feats `[B, N, C_in, fH, fW]`, image_size (H, W) of the network input -> BEV `[B, C * nz, ny, nx]`."""
        B, N, _, fH, fW = feats.shape
        if img_aug is None:
            img_aug = torch.eye(4, device=feats.device).expand(B, N, 4, 4)
        if lidar_aug is None:
            lidar_aug = torch.eye(4, device=feats.device).expand(B, 4, 4)
        with torch.no_grad():  # the geometry is fixed by the matrices; nothing to learn there
            geom = self.geometry(self.frustum((fH, fW), image_size), cam2img.float(), lidar2cam.float(),
                                 img_aug.float(), lidar_aug.float())
        return self.splat(geom, self.lift(feats))
