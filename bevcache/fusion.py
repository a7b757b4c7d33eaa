"""A camera + LiDAR BEV detector with BEVFusion's structure, built from mmdet3d/mmdet parts (CPU-friendly).

`FusedCenterPoint` (MODELS, mmdet3d scope) has the real BEVFusion's module names and data flow:

    imgs [B, N, 3, H, W] -> img_backbone -> img_neck -> view_transform -> camera BEV ─┐
                                                                                     fusion_layer -> pts_backbone -> pts_neck -> pts_bbox_head
    points -> data_preprocessor (voxels) -> pts_voxel_encoder -> pts_middle_encoder ─┘

Camera and LiDAR BEV maps are fused *before* `pts_backbone`, so `pts_neck` carries both (what a
distilled student learns from). Unlike mmdetection3d's project it needs no compiled op: the lift
is `bevcache.camera.LSSViewTransform` (torch bev_pool) and the head is mmdet3d's CenterHead, so the
whole model runs on a CPU-only machine and in CI without an mmdetection3d checkout.

With only one branch configured it is a single-modality detector of the same family: no
`pts_voxel_encoder`/`pts_middle_encoder` gives BEVFusion's camera branch alone (a camera student);
no `img_backbone`/`view_transform` gives a plain voxel CenterPoint. `fusion_layer` is needed exactly
when both are there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from mmdet3d.models.detectors import CenterPoint
from mmdet3d.registry import MODELS
from mmengine.model import BaseModule
from torch import Tensor, nn

from .camera import LSSViewTransform, camera_matrices
from .errors import ConfigError

__all__ = ["ConcatConvFuser", "FusedCenterPoint", "LSSViewTransform"]  # importing this module registers all three


@MODELS.register_module()
class ConcatConvFuser(BaseModule):
    """BEV maps `[B, C_i, H, W]` -> concat -> 3x3 conv, BN, ReLU -> `[B, out_channels, H, W]` (BEVFusion's ConvFuser)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, init_cfg: dict | list | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.in_channels = [int(c) for c in in_channels]
        self.conv = nn.Sequential(
            nn.Conv2d(sum(self.in_channels), out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True))

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        got = [m.shape[1] for m in maps]
        if got != self.in_channels:
            raise ConfigError(f"fusion_layer in_channels={self.in_channels} but the BEV maps have {got} channels "
                              "(camera first, then LiDAR); make them equal in the config")
        sizes = {tuple(m.shape[-2:]) for m in maps}
        if len(sizes) > 1:
            raise ConfigError(f"camera and LiDAR BEV maps differ in size {sorted(sizes)}: set the view_transform's "
                              "x/ybound to the LiDAR point_cloud_range with cells of voxel_size * out_size_factor")
        return self.conv(torch.cat(list(maps), dim=1))


@MODELS.register_module()
class FusedCenterPoint(CenterPoint):
    """BEVFusion's camera + LiDAR structure with a CenterHead; see the module docstring.

    Takes CenterPoint's arguments plus `view_transform` (a camera lift to the LiDAR BEV grid, e.g.
    LSSViewTransform) and `fusion_layer` (e.g. ConcatConvFuser, camera map first).
    """

    def __init__(self, view_transform: dict | None = None, fusion_layer: dict | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.view_transform = MODELS.build(view_transform) if view_transform else None
        self.fusion_layer = MODELS.build(fusion_layer) if fusion_layer else None
        cam = self.with_img_backbone and self.view_transform is not None
        lidar = hasattr(self, "pts_voxel_encoder") and hasattr(self, "pts_middle_encoder")
        if self.with_img_backbone != (self.view_transform is not None):
            raise ConfigError("FusedCenterPoint: img_backbone and view_transform come together (camera branch): "
                              "give both or neither")
        if not (cam or lidar):
            raise ConfigError("FusedCenterPoint needs a camera branch (img_backbone, img_neck, view_transform) "
                              "and/or a LiDAR branch (pts_voxel_encoder, pts_middle_encoder)")
        if (cam and lidar) != (self.fusion_layer is not None):
            raise ConfigError("FusedCenterPoint: fusion_layer is needed exactly when both the camera and the LiDAR "
                              f"branch are configured (camera={cam}, lidar={lidar})")
        self.with_camera, self.with_lidar = cam, lidar

    def extract_img_bev(self, imgs: Tensor, metas: Sequence[dict]) -> Tensor:
        """Normalised images `[B, N, 3, H, W]` -> camera BEV `[B, C_cam, ny, nx]`."""
        if imgs.dim() != 5:
            raise ConfigError(f"the camera branch expects multi-view images [B, N, 3, H, W], got {tuple(imgs.shape)}: "
                              "load them with LoadMultiViewImageFromFiles and pack 'img'")
        B, N, C, H, W = imgs.shape
        x = self.img_backbone(imgs.reshape(B * N, C, H, W))
        if self.with_img_neck:
            x = self.img_neck(x)
        if not isinstance(x, Tensor):
            x = x[0]  # the finest level, as BEVFusion does
        x = x.view(B, N, *x.shape[1:])  # [B, N, C_img, fH, fW]
        geo = camera_matrices(metas, N, device=x.device)
        assert self.view_transform is not None  # with_camera: built in __init__
        return self.view_transform(x, (H, W), geo["cam2img"], geo["lidar2cam"], geo["img_aug"], geo["lidar_aug"])

    def extract_lidar_bev(self, voxel_dict: dict, batch_size: int) -> Tensor:
        """Voxels -> LiDAR BEV `[B, C_lidar, ny, nx]` (pts_voxel_encoder, pts_middle_encoder)."""
        feats = self.pts_voxel_encoder(voxel_dict["voxels"], voxel_dict["num_points"], voxel_dict["coors"])
        # The batch size from the metas: coors[-1, 0] + 1 undercounts when the last sample has no points.
        return self.pts_middle_encoder(feats, voxel_dict["coors"], batch_size)

    def extract_feat(self, batch_inputs_dict: dict, batch_input_metas: list[dict]) -> tuple[None, list[Tensor]]:
        """(None, pts_neck outputs): no 2D image head, so no image features are returned separately."""
        maps = []
        if self.with_camera:
            if batch_inputs_dict.get("imgs") is None:
                raise ConfigError("this model has a camera branch but the batch has no images: add "
                                  "LoadMultiViewImageFromFiles and 'img' to Pack3DDetInputs' keys")
            maps.append(self.extract_img_bev(batch_inputs_dict["imgs"], batch_input_metas))
        if self.with_lidar:
            if batch_inputs_dict.get("voxels") is None:
                raise ConfigError("this model has a LiDAR branch but the batch has no voxels: load points and set "
                                  "data_preprocessor voxel=True")
            maps.append(self.extract_lidar_bev(batch_inputs_dict["voxels"], len(batch_input_metas)))
        x = self.fusion_layer(maps) if self.fusion_layer is not None else maps[0]
        x = self.pts_backbone(x)
        if self.with_pts_neck:
            x = self.pts_neck(x)
        return None, x

