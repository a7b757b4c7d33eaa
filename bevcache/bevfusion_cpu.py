"""mmdetection3d's BEVFusion (projects/BEVFusion), LiDAR-only or camera + LiDAR, without CUDA or its compiled ops.

A config switches this on by listing it before the project in `custom_imports`:

    custom_imports = dict(imports=['bevcache.bevfusion_cpu', 'projects.BEVFusion.bevfusion'], ...)

Importing it imports `projects.BEVFusion.bevfusion` (found on sys.path, else under $MMDET3D_ROOT)
after removing three obstacles of a CPU-only machine; with CUDA and the compiled ops it changes
nothing.

1. The package imports two extensions built only by `python projects/BEVFusion/setup.py develop`
   (`ops/bev_pool/bev_pool_ext`, `ops/voxel/voxel_layer`). Missing ones get a placeholder module
   whose functions raise `BEVFusionOpUnavailable` (nothing calls them once 1b and 2 are applied).
1b. The camera branch's `bev_pool` (a CUDA kernel): without CUDA, or with CUDA when `bev_pool_ext`
   was not compiled, `bevcache.bev_pool.bev_pool` (same definition, plain torch, differentiable)
   takes its place, so `DepthLSSTransform` / `LSSTransform` and the fused model run on the CPU.
2. BEVFusion's own CPU voxelization indexes its z,y,x cell table with x,y,z: it segfaults on a
   non-cubic grid such as BEVFusion's 1440 x 1440 x 41 (on a cubic one it is bit-equal to the
   stand-in). `MMCVVoxelization`, mmcv's kernel of the same algorithm with its coordinate columns
   reversed to BEVFusion's x,y,z, takes its place: without CUDA, or with CUDA when `voxel_layer`
   was not compiled.
3. spconv's sparse-conv backward on a CPU-only torch: the shim of bevcache.compat.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import logging
import os
import sys
import types
from pathlib import Path

import torch
from mmcv.ops import Voxelization as _MMCVVoxelization

from .errors import BEVFusionOpUnavailable

PACKAGE = "projects.BEVFusion.bevfusion"
# (extension module under projects/BEVFusion/bevfusion, the functions the project calls in it)
EXTENSIONS = (
    ("ops.bev_pool.bev_pool_ext", ("bev_pool_forward", "bev_pool_backward")),
    ("ops.voxel.voxel_layer", ("hard_voxelize", "dynamic_voxelize", "dynamic_point_to_voxel_forward",
                               "dynamic_point_to_voxel_backward")),
)
BUILD_HINT = "build it with `python projects/BEVFusion/setup.py develop` in the mmdetection3d checkout on a CUDA machine"

log = logging.getLogger("bevcache")
CHANGES: list[str] = []  # what activate() changed in this process (empty: nothing was needed)
_ACTIVE = False


class MMCVVoxelization(_MMCVVoxelization):
    """BEVFusion's hard/dynamic `Voxelization`, computed by mmcv's kernel (CPU or CUDA).

    Same arguments and outputs as `projects.BEVFusion.bevfusion.ops.Voxelization`: voxels
    `[M, max_points, C]`, coordinates `[M, 3]` int32 in x,y,z order (mmcv writes z,y,x), points per
    voxel `[M]`; dynamic mode (max_num_points=-1) returns per-point coordinates, -1 when outside.
    """

    def forward(self, points: torch.Tensor):
        out = super().forward(points)
        if isinstance(out, torch.Tensor):  # dynamic voxelization: [N, 3] coordinates only
            return out.flip(1).contiguous()
        voxels, coors, num_points = out
        return voxels, coors.flip(1).contiguous(), num_points


def package_dir() -> Path:
    """projects/BEVFusion/bevfusion of the checkout on sys.path (appending $MMDET3D_ROOT if needed)."""
    rel = Path("projects", "BEVFusion", "bevfusion", "__init__.py")
    for entry in sys.path:
        candidate = Path(entry or ".") / rel
        if candidate.is_file():
            return candidate.parent
    root = os.environ.get("MMDET3D_ROOT")
    if root and (Path(root) / rel).is_file():
        # Appended, not prepended: the installed mmdet3d keeps precedence over the checkout's copy.
        sys.path.append(str(Path(root).resolve()))
        return (Path(root) / rel).parent.resolve()
    where = f"MMDET3D_ROOT={root} has no {rel}" if root else "MMDET3D_ROOT is not set"
    raise ImportError(f"BEVFusion configs need an mmdetection3d checkout (projects/BEVFusion is not in the mmdet3d "
                      f"wheel): {where} and no sys.path entry has it. `export MMDET3D_ROOT=/path/to/mmdetection3d` "
                      "(and put it on PYTHONPATH).")


def _compiled(directory: Path, stem: str) -> bool:
    return any((directory / (stem + suffix)).is_file() for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def _unavailable(name: str, why: str):
    def call(*args, **kwargs):
        raise BEVFusionOpUnavailable(f"{name} is not available: {why}. bevcache.bevfusion_cpu replaces its callers "
                                     "(bev_pool by bevcache.bev_pool, voxelization by mmcv's); this call bypassed them.")

    call.__name__ = name.rsplit(".", 1)[-1]
    return call


def _placeholder(module: str, functions: tuple[str, ...]) -> types.ModuleType:
    stub = types.ModuleType(module, f"bevcache.bevfusion_cpu placeholder: {module} is not compiled")
    for fn in functions:
        setattr(stub, fn, _unavailable(f"{module}.{fn}", f"the extension is not compiled ({BUILD_HINT})"))
    return stub


def activate() -> list[str]:
    """Import projects.BEVFusion.bevfusion, runnable on this machine; returns what was changed."""
    global _ACTIVE
    if _ACTIVE:
        return CHANGES
    _ACTIVE = True
    directory = package_dir()
    cuda = torch.cuda.is_available()
    missing = _missing_extensions(directory)
    if missing and PACKAGE not in sys.modules:  # once imported, its extensions were there
        for module, functions in EXTENSIONS:
            if module in missing:
                sys.modules[f"{PACKAGE}.{module}"] = _placeholder(f"{PACKAGE}.{module}", functions)
        CHANGES.append("placeholders for the uncompiled " + ", ".join(m.rsplit(".", 1)[-1] for m in missing))
    package = importlib.import_module(PACKAGE)

    if not cuda or "ops.voxel.voxel_layer" in missing:
        for name in ("bevfusion", "ops", "ops.voxel"):
            importlib.import_module(f"{PACKAGE}.{name}").Voxelization = MMCVVoxelization  # type: ignore[attr-defined]
        CHANGES.append("voxelization by mmcv.ops.Voxelization (x,y,z columns)")
    if not cuda or "ops.bev_pool.bev_pool_ext" in missing:
        from .bev_pool import bev_pool

        # depth_lss looks `bev_pool` up in its own globals (`from .ops import bev_pool`); the ops
        # packages are patched too for code that imports it from there after us.
        for name in ("depth_lss", "ops", "ops.bev_pool", "ops.bev_pool.bev_pool"):
            importlib.import_module(f"{PACKAGE}.{name}").bev_pool = bev_pool  # type: ignore[attr-defined]
        CHANGES.append("bev_pool (camera branch) by bevcache.bev_pool (torch)")
    if not cuda:
        from .compat import patch_spconv_for_cpu

        if patch_spconv_for_cpu():
            CHANGES.append("spconv CPU backward shim")
    if CHANGES:
        _say(f"BEVFusion CPU path active ({package.__name__} from {directory.parent.parent.parent}): "
             + "; ".join(CHANGES))
    return CHANGES


def _missing_extensions(directory: Path) -> list[str]:
    missing = []
    for module, _ in EXTENSIONS:
        parts = module.split(".")
        if not _compiled(directory.joinpath(*parts[:-1]), parts[-1]):
            missing.append(module)
    return missing


def _say(message: str) -> None:
    """One INFO line: through bevcache's logger under the CLI, else mmengine's (mmdet3d's tools)."""
    if log.hasHandlers():
        log.info(message)
    else:
        from mmengine.logging import print_log

        print_log(f"bevcache: {message}", logger="current", level=logging.INFO)


activate()
