"""bevcache.bev_pool against a per-point Python loop (the op's definition), and its gradient."""

from __future__ import annotations

import time

import pytest
import torch

from bevcache.bev_pool import bev_pool

from .conftest import MMDET3D_CHECKOUT, needs_checkout_files


def naive_bev_pool(feats: torch.Tensor, coords: torch.Tensor, B: int, D: int, H: int, W: int) -> torch.Tensor:
    """The definition, one point at a time: out[b, :, z, x, y] += feats[i] for coords[i] = (x, y, z, b)."""
    out = torch.zeros(B, feats.shape[1], D, H, W, dtype=feats.dtype)
    for f, (x, y, z, b) in zip(feats, coords.tolist(), strict=True):
        out[b, :, z, x, y] += f
    return out


def random_case(n: int, C: int, B: int, D: int, H: int, W: int, *, seed: int, dtype=torch.float32,
                cells: int | None = None):
    """n points with random features; `cells` distinct cells at most, so many points share a cell."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, C, generator=g, dtype=dtype)
    pool = torch.stack([torch.randint(0, s, (cells or n,), generator=g) for s in (H, W, D, B)], 1)
    coords = pool[torch.randint(0, len(pool), (n,), generator=g)].int()
    return feats, coords


@pytest.mark.parametrize("B,D,H,W,n,cells,sparse", [
    (1, 1, 8, 8, 50, None, True),      # most cells empty
    (3, 2, 5, 7, 400, 12, True),       # batch > 1, non-square grid, many duplicate ranks per cell
    (2, 4, 3, 3, 1000, None, False),   # dense: every cell hit several times
])
def test_matches_loop_reference(B, D, H, W, n, cells, sparse):
    feats, coords = random_case(n, 6, B, D, H, W, seed=n, cells=cells)
    out = bev_pool(feats, coords, B, D, H, W)
    ref = naive_bev_pool(feats, coords, B, D, H, W)
    assert out.shape == (B, 6, D, H, W)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    hit = torch.zeros(B, D, H, W, dtype=torch.bool)
    hit[coords[:, 3].long(), coords[:, 2].long(), coords[:, 0].long(), coords[:, 1].long()] = True
    assert bool((~hit).any()) == sparse, "the case should (not) leave cells empty"
    assert not out.permute(0, 2, 3, 4, 1)[~hit].any()  # empty cells are exactly zero


def test_order_of_points_does_not_matter_and_is_deterministic():
    feats, coords = random_case(500, 4, 2, 2, 6, 6, seed=1, cells=20)
    perm = torch.randperm(500, generator=torch.Generator().manual_seed(2))
    a = bev_pool(feats, coords, 2, 2, 6, 6)
    torch.testing.assert_close(bev_pool(feats[perm], coords[perm], 2, 2, 6, 6), a)
    assert torch.equal(bev_pool(feats, coords, 2, 2, 6, 6), a)  # bitwise repeatable


def test_no_points_gives_zeros():
    out = bev_pool(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.int32), 2, 1, 4, 5)
    assert out.shape == (2, 3, 1, 4, 5) and not out.any()


def test_tensor_sizes_accepted():
    # BEVFusion passes entries of its `nx` parameter (0-d int64 tensors) as D, H, W.
    feats, coords = random_case(30, 2, 1, 1, 4, 4, seed=3)
    nx = torch.tensor([4, 4, 1])
    torch.testing.assert_close(bev_pool(feats, coords, 1, nx[2], nx[0], nx[1]), naive_bev_pool(feats, coords, 1, 1, 4, 4))


@pytest.mark.parametrize("bad", [(4, 0, 0, 0), (0, 5, 0, 0), (0, 0, 1, 0), (0, 0, 0, 2), (-1, 0, 0, 0)])
def test_out_of_grid_coords_refused(bad):
    coords = torch.tensor([[0, 0, 0, 0], bad])
    with pytest.raises(ValueError, match="outside the grid"):
        bev_pool(torch.ones(2, 1), coords, 2, 1, 4, 5)


def test_gradcheck_double():
    feats, coords = random_case(60, 3, 2, 2, 3, 4, seed=4, dtype=torch.float64, cells=10)
    feats.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: bev_pool(f, coords, 2, 2, 3, 4), (feats,))


def test_backward_gathers_cell_gradient():
    # d out[b, c, z, x, y] / d feats[i, c] = 1 for the point's own cell: grad = upstream grad at that cell.
    feats, coords = random_case(80, 2, 2, 1, 4, 4, seed=5, cells=9)
    feats.requires_grad_(True)
    upstream = torch.randn(2, 2, 1, 4, 4)
    (bev_pool(feats, coords, 2, 1, 4, 4) * upstream).sum().backward()
    c = coords.long()
    torch.testing.assert_close(feats.grad, upstream[c[:, 3], :, c[:, 2], c[:, 0], c[:, 1]])


# ---------------------------------------------------------------------------------------------
# The real BEVFusion camera lift (mmdetection3d's projects/BEVFusion DepthLSSTransform) on the CPU
# through bevcache.bevfusion_cpu, which swaps the CUDA bev_pool for this one. Needs a checkout.

CHECKOUT = MMDET3D_CHECKOUT
needs_checkout = needs_checkout_files("projects/BEVFusion/configs/"
                                      "bevfusion_lidar-cam_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py")
FUSED_CONFIG = "projects/BEVFusion/configs/bevfusion_lidar-cam_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py"


@needs_checkout
def test_real_depth_lss_transform_runs_on_cpu(monkeypatch):
    import copy

    import numpy as np
    from mmengine.config import Config

    monkeypatch.setenv("MMDET3D_ROOT", str(CHECKOUT))
    import importlib

    from mmdet3d.registry import MODELS

    from bevcache import bevfusion_cpu  # noqa: F401  (imports the project with the CPU stand-ins)
    from bevcache.bev_pool import bev_pool as torch_bev_pool

    depth_lss = importlib.import_module("projects.BEVFusion.bevfusion.depth_lss")
    if not torch.cuda.is_available():
        assert depth_lss.bev_pool is torch_bev_pool
    # The fused config's own view transform, shrunk: 64x176 images (stride-8 features 8x22, the
    # depth branch's 8x downsampling must land there), 30 depth bins, a 90x90 BEV at 1.2 m -> 45x45.
    cfg = copy.deepcopy(Config.fromfile(str(CHECKOUT / FUSED_CONFIG)).model.view_transform)
    assert cfg.type == "DepthLSSTransform"
    cfg.update(in_channels=32, out_channels=16, image_size=[64, 176], feature_size=[8, 22],
               xbound=[-54.0, 54.0, 1.2], ybound=[-54.0, 54.0, 1.2], dbound=[1.0, 60.0, 2.0])
    torch.manual_seed(0)
    vt = MODELS.build(cfg).train()
    B, N = 2, 2
    # Two cameras per sample looking along +x and -x from 1.5 m up; points all around.
    cam2lidar = torch.zeros(B, N, 4, 4)
    for n, sign in enumerate((1.0, -1.0)):
        cam2lidar[:, n] = torch.tensor([[0, 0, sign, 0], [-sign, 0, 0, 0], [0, -1.0, 0, 1.5], [0, 0, 0, 1]])
    k = torch.tensor([[80.0, 0, 87.5, 0], [0, 80.0, 31.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]]).expand(B, N, 4, 4)
    lidar2image = k @ torch.linalg.inv(cam2lidar)
    eye = torch.eye(4)
    g = torch.Generator().manual_seed(1)
    points = [torch.cat([(torch.rand(2000, 3, generator=g) - 0.5) * torch.tensor([80.0, 80.0, 4.0]),
                         torch.rand(2000, 2, generator=g)], 1) for _ in range(B)]
    feats = torch.randn(B, N, 32, 8, 22, generator=g, requires_grad=True)
    start = time.perf_counter()
    out = vt(feats, points, lidar2image, k, cam2lidar, eye.expand(B, N, 4, 4).clone(), eye.expand(B, 4, 4).clone(),
             [{} for _ in range(B)])
    out.square().mean().backward()
    print(f"DepthLSSTransform forward + backward on the CPU: {time.perf_counter() - start:.3f} s")
    assert out.shape == (B, 16, 45, 45) and torch.isfinite(out).all()
    assert out.abs().sum() > 0 and feats.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vt.depthnet.parameters())
    np.testing.assert_array_less(0, [float(p.grad.abs().sum()) for p in vt.dtransform.parameters() if p.dim() > 1])
