"""Warp a cached (un-augmented) teacher BEV map into a sample's augmented LiDAR frame.

Conventions (all verified against mmdet3d 1.4.0, see tests/test_warp.py):
- Frames: "source" = the un-augmented LiDAR frame the cache was made in; "augmented" = the frame
  the student sees after its train pipeline. Only the BEV plane (x, y) matters: every supported
  transform is a rotation about z, a uniform scale, a translation or an x/y flip.
- `bev_transform` returns a 3x3 affine A acting on column vectors: (x, y, 1)_aug = A @ (x, y, 1)_src.
  mmdet3d applies rotations as row vectors, `points @ pcd_rotation` (BasePoints.rotate), so the
  column-vector block is `pcd_rotation[:2, :2].T`; a horizontal flip negates y, a vertical flip
  negates x (LiDARPoints.flip); BEVFusion's 4x4 `lidar_aug_matrix` is already column-vector form.
- Maps are [..., C, H, W] with H along y and W along x, row index growing with y (CenterHead draws
  heatmap[y_idx, x_idx]). The map covers grid_range = (xmin, ymin, xmax, ymax) exactly: cell
  (row j, col i) is the square [xmin + i dx, xmin + (i+1) dx) x [ymin + j dy, ymin + (j+1) dy),
  its value sits at the cell centre, dx = (xmax - xmin) / W, dy = (ymax - ymin) / H.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError, WarpError  # noqa: F401  (WarpError: re-exported)

# What each known train transform does to the BEV map of a scene: (warpable, why). `non_warpable`
# reads it; a name not listed here is not judged (check `name in BEV_EFFECT` to refuse unknowns).
BEV_EFFECT: dict[str, tuple[bool, str]] = {
    "GlobalRotScaleTrans": (True, "global yaw rotation, scale, translation: recorded in pcd_* keys"),
    "RandomFlip3D": (True, "BEV flip: recorded in pcd_horizontal_flip / pcd_vertical_flip"),
    "BEVFusionGlobalRotScaleTrans": (True, "global rotation, translation, scale: recorded in lidar_aug_matrix"),
    "BEVFusionRandomFlip3D": (True, "BEV flip: recorded in lidar_aug_matrix"),
    "PointShuffle": (True, "reorders points only; voxel features do not depend on point order"),
    "PointsRangeFilter": (True, "drops points outside the grid; the warp's valid mask covers the rim"),
    "ObjectRangeFilter": (True, "filters ground-truth boxes only"),
    "ObjectNameFilter": (True, "filters ground-truth boxes only"),
    "ObjectSample": (False, "pastes database objects (points and boxes) the cached teacher never saw"),
    "ObjectNoise": (False, "moves and rotates each object with its points independently, not the scene"),
    "RandomJitterPoints": (False, "adds independent noise to every point"),
    "PointSample": (False, "drops/resamples points, so the features of thinned regions change"),
    "IndoorPointSample": (False, "drops/resamples points, so the features of thinned regions change"),
    "IndoorPatchPointSample": (False, "crops a random patch of points"),
    "VoxelBasedPointSampler": (False, "drops/resamples points per voxel"),
    "BackgroundPointsFilter": (False, "removes points around boxes: scene content changes"),
    "RandomDropPointsColor": (False, "changes point features (colour), not geometry"),
    "GlobalAlignment": (False, "applies axis_align_matrix, which transformation_3d_flow does not record"),
    "PolarMix": (False, "mixes in points of another scan"),
    "LaserMix": (False, "mixes in points of another scan"),
    "LoadPointsFromMultiSweeps": (False, "outside test_mode it picks sweeps at random when a sample has "
                                         "more than sweeps_num; the teacher saw the first ones"),
    "ImageAug3D": (False, "crops/resizes/rotates camera images: a camera-branch teacher saw other pixels "
                          "(harmless for a LiDAR-only teacher)"),
    "GridMask": (False, "masks camera image regions (harmless for a LiDAR-only teacher)"),
    "PhotoMetricDistortion3D": (False, "changes camera pixel values (harmless for a LiDAR-only teacher)"),
}


def non_warpable(pipeline: Iterable[str | Mapping[str, Any]]) -> dict[str, str]:
    """Transforms of a pipeline (names or config dicts, nested included) a BEV warp cannot express: name -> why."""
    found: dict[str, str] = {}
    for step in pipeline:
        cfg = step if isinstance(step, Mapping) else {"type": step}
        kind = cfg.get("type", "")
        name = (kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))).split(".")[-1]
        warpable, why = BEV_EFFECT.get(name, (True, ""))
        if name == "LoadPointsFromMultiSweeps" and cfg.get("test_mode"):
            warpable = True  # test_mode loads the first sweeps_num sweeps, as the teacher did
        if not warpable:
            found.setdefault(name, why)
        for key in ("transforms", "pipeline"):
            if isinstance(cfg.get(key), (list, tuple)):
                for inner, inner_why in non_warpable(cfg[key]).items():
                    found.setdefault(inner, inner_why)
    return found


def _array(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _flip(sx: float, sy: float) -> np.ndarray:
    return np.diag([sx, sy, 1.0])


def _keyed_ops(meta: Mapping[str, Any], flow: list[str]) -> dict[str, np.ndarray]:
    """The 3x3 of each op in a transformation_3d_flow, from mmdet3d's pcd_* keys."""
    ops: dict[str, np.ndarray] = {"HF": _flip(1, -1), "VF": _flip(-1, 1)}  # LiDARPoints.flip
    if "R" in flow:
        if meta.get("pcd_rotation") is not None:
            rot_t = _array(meta["pcd_rotation"])  # [3, 3], applied as points @ rot_t
        elif meta.get("pcd_rotation_angle") is not None:
            c, s = np.cos(float(meta["pcd_rotation_angle"])), np.sin(float(meta["pcd_rotation_angle"]))
            rot_t = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])  # rotation_3d_in_axis(axis=2)
        else:
            raise WarpError("transformation_3d_flow has 'R' but neither pcd_rotation nor "
                            "pcd_rotation_angle is recorded; keep them in Pack3DDetInputs' meta_keys.")
        if rot_t.shape != (3, 3) or not np.allclose([*rot_t[2, :2], *rot_t[:2, 2]], 0, atol=1e-6):
            raise WarpError(f"pcd_rotation must be a 3x3 rotation about z (yaw) to be a BEV warp. Got {rot_t.tolist()}.")
        ops["R"] = np.eye(3)
        ops["R"][:2, :2] = rot_t[:2, :2].T  # row-vector form -> column-vector form
    if "S" in flow:
        if meta.get("pcd_scale_factor") is None:
            raise WarpError("transformation_3d_flow has 'S' but pcd_scale_factor is not recorded.")
        ops["S"] = np.diag([float(meta["pcd_scale_factor"])] * 2 + [1.0])
    if "T" in flow:
        if meta.get("pcd_trans") is None:
            raise WarpError("transformation_3d_flow has 'T' but pcd_trans is not recorded.")
        ops["T"] = np.eye(3)
        ops["T"][:2, 2] = _array(meta["pcd_trans"]).reshape(-1)[:2]  # z does not move the BEV plane
    return ops


def _keyed_transform(meta: Mapping[str, Any]) -> np.ndarray | None:
    """mmdet3d's record (pcd_* keys in transformation_3d_flow order) as a 3x3, or None if absent."""
    flow = meta.get("transformation_3d_flow")
    if flow is None:
        augmented = (meta.get("pcd_horizontal_flip") or meta.get("pcd_vertical_flip")
                     or any(meta.get(k) is not None for k in ("pcd_rotation", "pcd_rotation_angle", "pcd_trans"))
                     or meta.get("pcd_scale_factor", 1.0) != 1.0)
        if augmented:
            raise WarpError("pcd_* augmentation keys are recorded without transformation_3d_flow, so "
                            "their order is unknown; keep 'transformation_3d_flow' in Pack3DDetInputs' meta_keys.")
        return None
    flow = list(flow)
    unknown = [op for op in flow if op not in ("R", "S", "T", "HF", "VF")]
    repeated = sorted({op for op in flow if flow.count(op) > 1})
    if unknown:
        raise WarpError(f"transformation_3d_flow {flow} has ops {unknown} that are not BEV warps "
                        "(known: R, S, T, HF, VF).")
    if repeated:
        raise WarpError(f"transformation_3d_flow {flow} repeats {repeated}: a second transform overwrote "
                        "the first one's pcd_* keys. Use one GlobalRotScaleTrans and one RandomFlip3D.")
    for op, key in (("HF", "pcd_horizontal_flip"), ("VF", "pcd_vertical_flip")):
        if key in meta and bool(meta[key]) != (op in flow):
            raise WarpError(f"{key}={meta[key]} disagrees with transformation_3d_flow {flow}.")
    ops = _keyed_ops(meta, flow)
    a = np.eye(3)
    for op in flow:  # recorded order: later ops act on the result of earlier ones
        a = ops[op] @ a
    return a


# How each augmentation transform records itself: mmdet3d's in pcd_* keys and transformation_3d_flow
# ("keyed": the ops it appends), BEVFusion's flip only in lidar_aug_matrix ("matrix"), BEVFusion's
# rotation/scale/translation in both.
RECORDERS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "GlobalRotScaleTrans": ("keyed", ("R", "S", "T")),
    "RandomFlip3D": ("keyed", None),  # appends HF and/or VF, or nothing when it did not flip
    "BEVFusionGlobalRotScaleTrans": ("both", ("R", "T", "S")),
    "BEVFusionRandomFlip3D": ("matrix", ()),
}


def augmentation_order(transform_names: Iterable[str]) -> tuple[str, ...]:
    """The train pipeline's augmentation recorders in order, checked composable: at most one transform
    that records only lidar_aug_matrix (its matrix is what the others' records leave unexplained)."""
    order = tuple(n for n in transform_names if n in RECORDERS)
    matrix_only = [n for n in order if RECORDERS[n][0] == "matrix"]
    if len(matrix_only) > 1:
        raise WarpError(f"the train pipeline has {len(matrix_only)} transforms that record only lidar_aug_matrix "
                        f"({matrix_only}): their separate effects cannot be told apart. Keep one of them.")
    keyed = [n for n in order if RECORDERS[n][0] in ("keyed", "both")]
    repeated = sorted({n for n in keyed if keyed.count(n) > 1})
    if repeated or ("GlobalRotScaleTrans" in keyed and "BEVFusionGlobalRotScaleTrans" in keyed):
        raise WarpError(f"the train pipeline repeats rotation/flip transforms {keyed}: a second one overwrites "
                        "the first one's pcd_* record. Use one rotation/scale/translation and one flip transform.")
    return order


def _composed(metainfo: Mapping[str, Any], order: Sequence[str]) -> np.ndarray:
    """Each recorder's own 3x3 from its part of the record, multiplied in pipeline order."""
    flow = list(metainfo.get("transformation_3d_flow") or [])
    ops = _keyed_ops(metainfo, flow) if flow else {}
    recorded = metainfo.get("lidar_aug_matrix")
    matrix = np.eye(3)
    if recorded is not None:
        m = _array(recorded)
        if m.shape != (4, 4) or not np.allclose([*m[2, :2], *m[:2, 2]], 0, atol=1e-6):
            raise WarpError("lidar_aug_matrix must be a 4x4 whose rotation is about z only to be a BEV warp. "
                            f"Got {m.tolist()}.")
        matrix[:2, :2], matrix[:2, 2] = m[:2, :2], m[:2, 3]
    own: list[np.ndarray | None] = []
    position = 0
    for name in order:
        kind, appends = RECORDERS[name]
        if kind == "matrix":
            own.append(None)  # solved below from lidar_aug_matrix
            continue
        if appends is None:  # a flip: whatever HF/VF it appended
            segment = []
            while position < len(flow) and flow[position] in ("HF", "VF"):
                segment.append(flow[position])
                position += 1
        else:
            segment = flow[position:position + len(appends)]
            if segment != list(appends):
                raise WarpError(f"transformation_3d_flow {flow} does not hold {name}'s ops {list(appends)} where the "
                                f"pipeline order {list(order)} puts them; keep 'transformation_3d_flow' and the "
                                "pcd_* keys in Pack3DDetInputs' meta_keys.")
            position += len(appends)
        a = np.eye(3)
        for op in segment:
            a = ops[op] @ a
        own.append(a)
    if position != len(flow):
        raise WarpError(f"transformation_3d_flow {flow} records ops {flow[position:]} that no known augmentation "
                        f"transform of the pipeline ({list(order)}) made.")
    unknown = [i for i, a in enumerate(own) if a is None]  # (`in`/`index` would compare arrays elementwise)
    if unknown:  # the matrix-only recorder: lidar_aug_matrix = after @ U @ before over matrix recorders
        at = unknown[0]
        before, after = np.eye(3), np.eye(3)
        for i, (name, known) in enumerate(zip(order, own, strict=True)):
            if RECORDERS[name][0] == "both" and known is not None:
                if i < at:
                    before = known @ before
                else:
                    after = known @ after
        own[at] = np.linalg.inv(after) @ matrix @ np.linalg.inv(before)
    elif any(RECORDERS[n][0] == "both" for n in order):
        expected = np.eye(3)
        for name, known in zip(order, own, strict=True):
            if RECORDERS[name][0] == "both" and known is not None:
                expected = known @ expected
        if not np.allclose(expected, matrix, atol=1e-5):
            raise WarpError("lidar_aug_matrix disagrees with the pcd_* keys of BEVFusionGlobalRotScaleTrans; a "
                            "transform outside the known ones changed it.")
    total = np.eye(3)
    for known in own:
        assert known is not None  # every recorder's matrix is known or solved by now
        total = known @ total
    return total


def bev_transform(metainfo: Mapping[str, Any], order: Sequence[str] | None = None) -> np.ndarray:
    """3x3 float64 affine of (x, y, 1) columns from the un-augmented to the augmented LiDAR frame.

    `order`: the train pipeline's augmentation transforms (`augmentation_order`); with it, any mix of
    mmdet3d's and BEVFusion's transforms is composed, each from its own record. Without it the
    record alone must say everything (one family of transforms, or the matrix complete)."""
    if order is not None:
        return _composed(metainfo, order)
    keyed = _keyed_transform(metainfo)
    if metainfo.get("lidar_aug_matrix") is None:
        return np.eye(3) if keyed is None else keyed
    m = _array(metainfo["lidar_aug_matrix"])  # [4, 4], column vectors (BEVFusion transforms_3d.py)
    if m.shape != (4, 4) or not np.allclose([*m[2, :2], *m[:2, 2]], 0, atol=1e-6):
        raise WarpError("lidar_aug_matrix must be a 4x4 whose rotation is about z only to be a BEV warp. "
                        f"Got {m.tolist()}.")
    a = np.eye(3)
    a[:2, :2], a[:2, 2] = m[:2, :2], m[:2, 3]
    if keyed is None:
        return a
    # BEVFusionGlobalRotScaleTrans records both forms; BEVFusionRandomFlip3D only the matrix. So the
    # matrix is complete unless an mmdet3d transform recorded only pcd_* keys.
    flow = list(metainfo.get("transformation_3d_flow") or [])
    flips = [_flip(sx, sy) for sx in (1, -1) for sy in (1, -1)]
    if "HF" in flow or "VF" in flow or not any(
        np.allclose(a, f @ keyed, atol=1e-5) or np.allclose(a, keyed @ f, atol=1e-5) for f in flips
    ):
        raise WarpError(
            f"lidar_aug_matrix and the pcd_* keys (flow {flow}) record different augmentations: the pipeline mixes "
            "mmdet3d's and BEVFusion's augmentation transforms, whose joint order the record alone does not hold: "
            "pass the pipeline's order (bev_transform(meta, augmentation_order(names)); the distiller does)."
        )
    return a


def _pixel_to_metric(grid_range: tuple[float, float, float, float], h: int, w: int) -> Tensor:
    """3x3 float64: (col, row, 1) cell index (cell centre) -> (x, y, 1) metres."""
    xmin, ymin, xmax, ymax = (float(v) for v in grid_range)
    dx, dy = (xmax - xmin) / w, (ymax - ymin) / h
    return torch.tensor([[dx, 0, xmin + dx / 2], [0, dy, ymin + dy / 2], [0, 0, 1]], dtype=torch.float64)


def _lattice_map(src: Tensor, h: int, w: int) -> Tensor | None:
    """The integer 3x3 if output cell centres map onto source cell centres (a flip/permutation), else None."""
    r = src.round()
    lin = r[:2, :2]
    signed_permutation = bool((lin.abs().sum(0) == 1).all() and (lin.abs().sum(1) == 1).all())
    corners = torch.tensor([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], dtype=torch.float64).T
    on_centres = bool(((src - r) @ corners).abs().max() < 1e-3)  # affine: worst error is at a corner
    return r.long() if signed_permutation and on_centres else None


def warp_bev(
    maps: Tensor, transforms: Tensor, grid_range: tuple[float, float, float, float]
) -> tuple[Tensor, Tensor]:
    """Warp [B, C, H, W] source-frame maps by [B, 3, 3] `bev_transform`s -> (warped, valid [B, 1, H, W]).

    Output cell centres are mapped back through the inverse transform; a cell whose source point
    lies outside the map's extent is invalid (mask 0, value 0). Where every output centre lands
    on a source centre (flips, whole-cell shifts, 90-degree turns) values are copied exactly by
    indexing; otherwise they are sampled bilinearly (align_corners=False: -1/+1 are the map's
    outer edges, so cell centres sit where `_pixel_to_metric` puts them). Inside the extent but
    beyond the outermost centres (half a cell) the edge value is used, not a blend with zeros.
    Returns float32 (float64 stays float64); the mask in the same dtype.
    """
    if maps.ndim != 4 or transforms.shape != (maps.shape[0], 3, 3):
        raise ValueError(f"expected maps [B, C, H, W] and transforms [B, 3, 3]. Got "
                         f"{tuple(maps.shape)} and {tuple(transforms.shape)}.")
    b, c, h, w = maps.shape
    maps = maps.to(torch.promote_types(maps.dtype, torch.float32))
    pix = _pixel_to_metric(grid_range, h, w)  # [3, 3]
    inv = torch.linalg.inv(transforms.detach().to("cpu", torch.float64))  # [B, 3, 3] augmented -> source
    src = pix.inverse() @ inv @ pix  # [B, 3, 3]: output cell index -> (fractional) source cell index
    warped, valid = maps.new_zeros(b, c, h, w), maps.new_zeros(b, 1, h, w)

    lattice = [_lattice_map(src[i], h, w) for i in range(b)]
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # [H, W]
    for i, r in enumerate(lattice):
        if r is None:
            continue
        si = r[0, 0] * cols + r[0, 1] * rows + r[0, 2]  # [H, W] source column
        sj = r[1, 0] * cols + r[1, 1] * rows + r[1, 2]  # [H, W] source row
        ok = ((si >= 0) & (si < w) & (sj >= 0) & (sj < h)).to(maps.device)  # [H, W]
        flat = (sj.clamp(0, h - 1) * w + si.clamp(0, w - 1)).flatten().to(maps.device)  # [H*W]
        taken = maps[i].flatten(1)[:, flat].view(c, h, w)  # [C, H, W]
        warped[i] = torch.where(ok, taken, 0)
        valid[i, 0] = ok

    rest = [i for i, r in enumerate(lattice) if r is None]
    if rest:
        # normalised coordinate g = (2 * index + 1) / n - 1 (align_corners=False)
        norm = torch.tensor([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]], dtype=torch.float64)
        theta = (norm @ src[rest] @ norm.inverse())[:, :2]  # [n, 2, 3]
        grid = F.affine_grid(theta.to(maps.device), [len(rest), c, h, w], align_corners=False)  # [n, H, W, 2] f64
        inside = (grid.abs() <= 1).all(-1)[:, None]  # [n, 1, H, W] source within the map's extent
        sampled = F.grid_sample(maps[rest], grid.to(maps.dtype), mode="bilinear",
                                padding_mode="border", align_corners=False)  # [n, C, H, W]
        index = torch.tensor(rest, device=maps.device)
        warped[index] = torch.where(inside, sampled, 0)
        valid[index] = inside.to(maps.dtype)
    return warped, valid


def gaussian_foreground(
    boxes: Any,
    grid_range: tuple[float, float, float, float],
    size: tuple[int, int],
    *,
    min_radius: int = 2,
    overlap: float = 0.1,
) -> Tensor:
    """CenterPoint-style [H, W] heatmap in [0, 1] of BEV boxes on the map's grid (max over boxes).

    boxes: mmdet3d LiDAR boxes (`.tensor` [N, 7+]: x, y, z, x_size, y_size, z_size, yaw, ...), a
    tensor in that layout, or a [N, 5] tensor (x, y, x_size, y_size, yaw). As in CenterHead
    (centerpoint_head.py get_targets_single): radius = max(min_radius, int(gaussian_radius(
    (y_size, x_size) in cells, overlap))), drawn by draw_heatmap_gaussian at the centre's cell;
    yaw is ignored. Defaults are the nuScenes CenterPoint train_cfg. Unlike CenterHead, the
    centre cell is floor()ed, so a centre just below xmin/ymin is skipped, not drawn on cell 0.
    """
    from mmdet3d.models.utils import draw_heatmap_gaussian, gaussian_radius

    t = boxes.tensor if hasattr(boxes, "tensor") else torch.as_tensor(boxes)
    if t.ndim != 2 or not (t.shape[1] == 5 or t.shape[1] >= 7):
        raise ValueError(f"expected boxes [N, 5] (x, y, x_size, y_size, yaw) or [N, 7+] (mmdet3d LiDAR). "
                         f"Got {tuple(t.shape)}.")
    t = t.detach().float()
    xy, dims = t[:, :2], (t[:, 2:4] if t.shape[1] == 5 else t[:, 3:5])  # [N, 2] each
    h, w = size
    xmin, ymin, xmax, ymax = (float(v) for v in grid_range)
    cell = torch.tensor([(xmax - xmin) / w, (ymax - ymin) / h])  # [2] metres per cell (x, y)
    heatmap = torch.zeros(h, w, device=t.device)  # [H(y), W(x)]
    centres = ((xy.cpu() - torch.tensor([xmin, ymin])) / cell).floor().long()  # [N, 2] (col, row)
    sizes = dims.cpu() / cell  # [N, 2] (x_size, y_size) in cells
    for (col, row), (length, width) in zip(centres.tolist(), sizes, strict=True):
        if not (length > 0 and width > 0 and 0 <= col < w and 0 <= row < h):
            continue
        radius = max(min_radius, int(gaussian_radius((width, length), min_overlap=overlap)))
        draw_heatmap_gaussian(heatmap, torch.tensor([col, row]), radius)
    return heatmap
