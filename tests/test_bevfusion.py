"""The real BEVFusion-L teacher (mmdetection3d's projects/BEVFusion, LiDAR-only) through bevcache on CPU.

Skipped unless an mmdetection3d checkout is found ($MMDET3D_ROOT, else ../mmdetection3d beside the
repository). Everything runs on the reduced grid of configs/bevfusion/*_small.py (384 voxels per
side: a 48 x 48 BEV map, ~1.2 s per teacher forward on 2 threads), batch 1, 4 training samples,
through the `bevcache` command line with `--data-root` pointing at `bevcache synth` output; the
subprocesses get MMDET3D_ROOT only (bevcache.bevfusion_cpu finds the checkout from it).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import (
    CONFIGS,
    MMDET3D_CHECKOUT,
    bevcache_cmd,
    needs_checkout_files,
    run_command,
)

CHECKOUT = MMDET3D_CHECKOUT
# Every test loads the project's LiDAR config (through configs/bevfusion/*.py).
pytestmark = needs_checkout_files(
    "projects/BEVFusion/configs/bevfusion_lidar_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py",
    "configs/_base_/default_runtime.py")
TEACHER = CONFIGS / "bevfusion" / "teacher_lidar_small.py"
STUDENT = CONFIGS / "bevfusion" / "student_lidar_small.py"
TRAIN_SAMPLES, VAL_SAMPLES = 4, 2

# A few iterations of the student instead of its 20-epoch schedule: `bevcache train --max-iters N`,
# batch 1 without loader workers.
def short(iters: int) -> list:
    return ["--max-iters", iters, "--cfg-options", "train_dataloader.batch_size=1", "train_dataloader.num_workers=0",
            "train_dataloader.persistent_workers=False"]


@pytest.fixture(scope="module")
def env():
    """Environment of every subprocess: the checkout named by MMDET3D_ROOT alone (no PYTHONPATH)."""
    before = os.environ.get("MMDET3D_ROOT")
    os.environ["MMDET3D_ROOT"] = str(CHECKOUT)  # for this process too (bevcache.bevfusion_cpu reads it)
    yield {**os.environ, "MMDET3D_ROOT": str(CHECKOUT)}
    if before is None:
        os.environ.pop("MMDET3D_ROOT")
    else:
        os.environ["MMDET3D_ROOT"] = before


run = run_command


def cli(*args, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    return run(bevcache_cmd(*map(str, args)), env, ok=ok)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def bev_data(tmp_path_factory, env) -> Path:
    """`bevcache synth`: 4 train / 2 val samples with one sweep each (BEVFusion loads 9 sweeps, padding)."""
    root = tmp_path_factory.mktemp("bevfusion") / "data"
    cli("synth", root, "--samples", TRAIN_SAMPLES, "--val-samples", VAL_SAMPLES, "--seed", 0, "--sweeps", 1, env=env)
    return root


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory, env) -> Path:
    """A randomly initialised BEVFusion-L (BN statistics perturbed), saved with its state dict's _metadata."""
    from mmdet3d.registry import MODELS

    from bevcache.runtime import load_config, setup_runtime

    setup_runtime()
    cfg = load_config(TEACHER)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MODELS.build(copy.deepcopy(cfg.model))  # BEVFusion.__init__ pops keys of its config
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("bevfusion-ckpt") / "teacher.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"test": "random init"}}, path)
    return path


# ---------------------------------------------------------------------------------------------
# 1. bevcache.bevfusion_cpu: the project imports and runs without CUDA or its compiled ops


def test_project_imports_with_cpu_stand_ins(env):
    import importlib

    from bevcache import bevfusion_cpu

    package = importlib.import_module("projects.BEVFusion.bevfusion")
    assert Path(package.__file__).resolve().is_relative_to(CHECKOUT)
    if not torch.cuda.is_available():
        assert importlib.import_module("projects.BEVFusion.bevfusion.bevfusion").Voxelization is bevfusion_cpu.MMCVVoxelization
        assert any("voxelization by mmcv" in c for c in bevfusion_cpu.CHANGES)


def test_compiled_ops_are_replaced_or_fail_clearly(env):
    import importlib

    from bevcache.bevfusion_cpu import BEVFusionOpUnavailable, activate

    activate()
    if torch.cuda.is_available():
        pytest.skip("with CUDA, bev_pool runs (when compiled)")
    from bevcache.bev_pool import bev_pool

    depth_lss = importlib.import_module("projects.BEVFusion.bevfusion.depth_lss")
    assert depth_lss.bev_pool is bev_pool  # the camera lift runs on the torch bev_pool
    ext = sys.modules["projects.BEVFusion.bevfusion.ops.bev_pool.bev_pool_ext"]
    if getattr(ext, "__file__", None) is None:  # the placeholder
        with pytest.raises(BEVFusionOpUnavailable, match="not compiled.*setup.py develop"):
            ext.bev_pool_forward()


def test_config_alone_switches_it_on(env):
    """Loading the shipped config (as mmdet3d's tools do) is enough: one log line, a buildable model."""
    code = ("import copy; from mmengine.config import Config; from mmdet3d.utils import register_all_modules; "
            "register_all_modules(); from mmdet3d.registry import MODELS; "
            f"cfg = Config.fromfile({str(CONFIGS / 'bevfusion' / 'teacher_lidar.py')!r}); "
            "m = MODELS.build(copy.deepcopy(cfg.model)); print('voxel layer', type(m.pts_voxel_layer).__module__)")
    proc = run([sys.executable, "-c", code], {k: v for k, v in env.items() if k != "PYTHONPATH"})
    out = proc.stdout + proc.stderr
    assert out.count("BEVFusion CPU path active") == (0 if torch.cuda.is_available() else 1), out[-2000:]
    if not torch.cuda.is_available():
        assert "voxel layer bevcache.bevfusion_cpu" in out


def reference_voxelize(points: np.ndarray, voxel_size, pc_range, max_points: int, max_voxels: int):
    """Hard voxelization by its definition, point by point in numpy: a voxel per occupied cell in the
    order of its first point, at most max_voxels of them, each keeping its first max_points points;
    cells of floor((p - min) / size) in float32, coordinates x,y,z."""
    pts = points.astype(np.float32)
    size = np.asarray(voxel_size, np.float32)
    low, high = np.asarray(pc_range[:3], np.float32), np.asarray(pc_range[3:], np.float32)
    grid = np.floor((high - low) / size + np.float32(0.5)).astype(np.int64)
    cells = np.floor((pts[:, :3] - low) / size).astype(np.int64)
    inside = ((cells >= 0) & (cells < grid)).all(axis=1)
    index: dict[tuple, int] = {}
    voxels = np.zeros((max_voxels, max_points, pts.shape[1]), np.float32)
    coords, counts = [], []
    for i in np.flatnonzero(inside):
        key = tuple(cells[i])
        v = index.get(key)
        if v is None:
            if len(coords) >= max_voxels:
                continue
            v = index[key] = len(coords)
            coords.append(key)
            counts.append(0)
        if counts[v] < max_points:
            voxels[v, counts[v]] = pts[i]
            counts[v] += 1
    dynamic = np.where(inside[:, None], cells, -1).astype(np.int32)
    return voxels[:len(coords)], np.asarray(coords, np.int32).reshape(-1, 3), np.asarray(counts, np.int32), dynamic


def _points(rng: np.random.Generator, pc_range, voxel_size, n: int = 6000) -> np.ndarray:
    """Points over and around the range, a crowded cell, and points on cell boundaries (5 features)."""
    low, high = np.asarray(pc_range[:3]), np.asarray(pc_range[3:])
    spread = rng.uniform(low - 2, high + 2, size=(n, 3))
    crowd = rng.uniform(0, 1, size=(50, 3)) * np.asarray(voxel_size) * 0.9 + (low + high) / 2
    edges = low + rng.integers(0, 40, size=(200, 3)) * np.asarray(voxel_size, np.float32)
    xyz = np.concatenate([spread, crowd, edges, [high, low]])
    return np.concatenate([xyz, rng.normal(size=(len(xyz), 2))], axis=1).astype(np.float32)


@pytest.mark.parametrize("pc_range, voxel_size, max_points, max_voxels", [
    ([-54.0, -54.0, -5.0, 54.0, 54.0, 3.0], [0.075, 0.075, 0.2], 10, 160000),  # BEVFusion-L's grid
    ([-14.4, -14.4, -5.0, 14.4, 14.4, 3.0], [0.075, 0.075, 0.2], 10, 500),     # reduced; the voxel cap bites
    ([-3.0, -2.0, -1.0, 3.0, 2.0, 1.0], [0.5, 0.25, 0.4], 3, 100000),           # non-cubic cells, few points each
])
def test_voxelization_matches_numpy_reference(env, pc_range, voxel_size, max_points, max_voxels):
    from bevcache.bevfusion_cpu import MMCVVoxelization

    points = _points(np.random.default_rng(0), pc_range, voxel_size)
    voxels, coords, counts, dynamic = reference_voxelize(points, voxel_size, pc_range, max_points, max_voxels)
    layer = MMCVVoxelization(voxel_size, pc_range, max_points, [max_voxels, max_voxels]).eval()
    got = layer(torch.from_numpy(points))
    assert coords.shape[0] > 0 and coords.dtype == np.int32
    np.testing.assert_array_equal(got[1].numpy(), coords)  # x,y,z as BEVFusion's sparse encoder expects
    np.testing.assert_array_equal(got[2].numpy(), counts)
    assert np.array_equal(got[0].numpy(), voxels)  # bit-equal, padding included
    dyn = MMCVVoxelization(voxel_size, pc_range, -1, -1)(torch.from_numpy(points))
    np.testing.assert_array_equal(dyn.numpy(), dynamic)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_voxelization_matches_native_op(env, device):
    """Bit-equal to BEVFusion's own compiled op where it runs: on CUDA with the real grid; on CPU only
    with a cubic grid (its CPU kernel allocates the cell table z,y,x and indexes it x,y,z, which
    segfaults on BEVFusion's 1440 x 1440 x 41 grid; checked once by hand with a /tmp build)."""
    from bevcache import bevfusion_cpu

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not bevfusion_cpu._compiled(bevfusion_cpu.package_dir() / "ops" / "voxel", "voxel_layer"):
        pytest.skip("BEVFusion's voxel op is not compiled (python projects/BEVFusion/setup.py develop)")
    from projects.BEVFusion.bevfusion.ops.voxel.voxelize import Voxelization as Native

    if device == "cuda":
        pc_range, voxel_size, n, max_voxels = [-54.0, -54.0, -5.0, 54.0, 54.0, 3.0], [0.075, 0.075, 0.2], 200000, 160000
    else:
        pc_range, voxel_size, n, max_voxels = [-3.0, -3.0, -3.0, 3.0, 3.0, 3.0], [0.2, 0.2, 0.2], 20000, 2000
    points = torch.from_numpy(_points(np.random.default_rng(1), pc_range, voxel_size, n=n)).to(device)
    for mode in ("train", "eval"):
        native = getattr(Native(voxel_size, pc_range, 10, [max_voxels, max_voxels]), mode)()(points)
        ours = getattr(bevfusion_cpu.MMCVVoxelization(voxel_size, pc_range, 10, [max_voxels, max_voxels]), mode)()(points)
        for a, b in zip(native, ours, strict=True):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# 2. bevcache extract / train / export-student with the real teacher (reduced grid, synthetic data)


@pytest.fixture(scope="module")
def neck_store(tmp_path_factory, bev_data, teacher_checkpoint, env) -> Path:
    out = tmp_path_factory.mktemp("bevfusion-store") / "neck.zarr"
    cli("extract", "--config", TEACHER, "--checkpoint", teacher_checkpoint, "--data-root", bev_data,
        "--out", out, "--batch-size", 1, "--num-workers", 0, env=env)
    return out


def test_extract_pooled_pts_neck(neck_store, env):
    from bevcache.store import open_store

    store = open_store(str(neck_store))
    assert store.num_samples == TRAIN_SAMPLES and store.complete_mask().all() and store.verify() == []
    assert store.layers["pts_neck"].dim == 512  # SECONDFPN's two 256-channel outputs, concatenated
    table = store.read_table("pts_neck").float()
    assert torch.isfinite(table).all() and table.std(0).max() > 0


def test_extract_several_layers(tmp_path, bev_data, teacher_checkpoint, env):
    """Layers before, at and after pts_neck; the forward stops after the head's shared conv."""
    from bevcache.store import open_store

    out = tmp_path / "layers.zarr"
    cli("extract", "--config", TEACHER, "--checkpoint", teacher_checkpoint, "--data-root", bev_data, "--out", out,
        "--batch-size", 1,
        "--num-workers", 0, "--layers", "pts_neck,pts_middle_encoder,bbox_head.shared_conv", env=env)
    store = open_store(str(out))
    dims = {name: spec.dim for name, spec in store.layers.items()}
    assert dims == {"pts_neck": 512, "pts_middle_encoder": 256, "bbox_head.shared_conv": 128}
    assert store.complete_mask().all()


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory, bev_data, neck_store, env) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("bevfusion-cached")
    proc = cli("train", "--student", STUDENT, "--cache", neck_store, "--data-root", bev_data,
               "--work-dir", work / "run", *short(3), env=env)
    return work / "run", proc


def test_train_cached(cached_run):
    work, proc = cached_run
    assert (work / "iter_3.pth").is_file() and (work / "student_weights.pth").is_file()
    assert "loss_crd_pts_neck" in proc.stdout + proc.stderr
    # The shipped student keeps the documented default ('auto' -> keep for pooled CRD): the random
    # train transforms, BEVFusion's own flip included (found by running them), are kept and named.
    output = (proc.stdout + proc.stderr).splitlines()
    kept = next(line for line in output if "keeping the random train transforms" in line)
    for name in ("ObjectSample", "GlobalRotScaleTrans", "BEVFusionRandomFlip3D", "PointShuffle"):
        assert name in kept, kept
    assert not any("DROPPED" in line for line in output)


def test_train_online(tmp_path, bev_data, teacher_checkpoint, env):
    proc = cli("train", "--student", STUDENT, "--teacher-online", TEACHER,
               "--teacher-checkpoint", teacher_checkpoint, "--data-root", bev_data, "--work-dir", tmp_path / "run",
               *short(2), env=env)
    assert (tmp_path / "run" / "iter_2.pth").is_file()
    assert "loss_crd_pts_neck" in proc.stdout + proc.stderr


def _load_into_full_student(weights: Path, trained: Path) -> None:
    """A plain BEVFusion student: strict load into student_lidar.py (full grid), same tensors as trained."""
    from mmdet3d.registry import MODELS
    from mmengine.runner import load_checkpoint

    from bevcache.runtime import load_config, setup_runtime

    setup_runtime()
    model = MODELS.build(copy.deepcopy(load_config(CONFIGS / "bevfusion" / "student_lidar.py").model))
    load_checkpoint(model, str(weights), map_location="cpu", strict=True)  # spconv layout from _metadata
    state = torch.load(trained, map_location="cpu", weights_only=False)["state_dict"]
    weight = "pts_middle_encoder.conv_input.0.weight"
    assert torch.equal(model.state_dict()[weight], state[f"student.{weight}"])


def test_trained_student_loads_strictly_into_the_full_student(cached_run, env):
    work, _ = cached_run
    _load_into_full_student(work / "student_weights.pth", work / "iter_3.pth")


def test_export_student(cached_run, tmp_path, env):
    work, _ = cached_run
    out = tmp_path / "student.pth"
    cli("export-student", work / "iter_3.pth", out, env=env)
    _load_into_full_student(out, work / "iter_3.pth")


def test_replay_is_refused_or_exact(tmp_path, bev_data, teacher_checkpoint, env):
    """Views through BEVFusion's train pipeline (ObjectSample, rotation, BEVFusionRandomFlip3D, shuffle):
    the student either replays exactly the teacher's inputs or is refused at the first differing one."""
    store = tmp_path / "views.zarr"
    cli("extract", "--config", TEACHER, "--checkpoint", teacher_checkpoint, "--data-root", bev_data,
        "--out", store, "--views", 1, "--batch-size", 1, "--num-workers", 0, env=env)
    proc = cli("train", "--student", STUDENT, "--cache", store, "--data-root", bev_data,
               "--distill", "augmentation=replay", "--work-dir", tmp_path / "run", *short(2), env=env, ok=False)
    if proc.returncode == 0:
        assert (tmp_path / "run" / "iter_2.pth").is_file()
        return
    errors = error_lines(proc)
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert "augmented input differs" in errors[0] and "view" in errors[0], errors[0]


def test_spatial_warp_with_the_stock_pipeline(tmp_path, bev_data, teacher_checkpoint, env):
    """mmdet3d's GlobalRotScaleTrans + BEVFusion's matrix-only flip compose into one warp; the BEV
    range comes from voxelize_cfg. ObjectSample (pasted objects the teacher never saw) is refused
    before any step unless knowingly allowed."""
    store = tmp_path / "spatial.zarr"
    cli("extract", "--config", TEACHER, "--checkpoint", teacher_checkpoint, "--data-root", bev_data,
        "--out", store, "--spatial", "pts_neck=12", "--batch-size", 1, "--num-workers", 0, env=env)
    base = ["train", "--student", STUDENT, "--cache", store, "--data-root", bev_data, *short(2)]
    refused = cli(*base, "--work-dir", tmp_path / "refused", "--distill", "spatial={'grid': (12, 12)}", env=env,
                  ok=False)
    errors = error_lines(refused)
    assert refused.returncode == 1 and len(errors) == 1 and "ObjectSample" in errors[0], refused.stderr[-3000:]
    assert not (tmp_path / "refused" / "iter_1.pth").exists()
    proc = cli(*base, "--work-dir", tmp_path / "run",
               "--distill", "spatial={'grid': (12, 12), 'ignore_non_warpable': True}", env=env)
    out = proc.stdout + proc.stderr
    assert "loss_spatial_pts_neck" in out and (tmp_path / "run" / "iter_2.pth").is_file()


def test_tools_train_with_the_readme_config_form(tmp_path, bev_data, neck_store, env):
    """mmdet3d's own tools/train.py on a BEVFusion student config written as the README says:
    `custom_imports` adds bevcache to the project's imports (no KeyError for BEVFusion)."""
    from bevcache.data import set_data_root
    from bevcache.runtime import load_config

    student = load_config(STUDENT)
    set_data_root(student, str(bev_data))  # what --data-root does: datasets and ObjectSample's database
    student.dump(str(tmp_path / "student_data.py"))
    config = tmp_path / "student_crd.py"
    config.write_text(f"""
_base_ = ['./student_data.py']
custom_imports = dict(imports=_base_.custom_imports.imports + ['bevcache'], allow_failed_imports=False)
model = dict(_delete_=True, type='CRDDistiller', student={{{{_base_.model}}}}, cache={str(neck_store)!r})
distill = None
custom_hooks = [dict(type='DistillationHook'), dict(type='StudentExportHook')]
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=1, val_interval=10**9)
param_scheduler = []
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=1, by_epoch=False),
                     logger=dict(type='LoggerHook', interval=1))
log_processor = dict(by_epoch=False)
train_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False)
val_dataloader = None
val_cfg = None
val_evaluator = None
""")
    tools_train = Path(__import__("mmdet3d").__file__).parent / ".mim" / "tools" / "train.py"
    proc = run([sys.executable, str(tools_train), str(config), "--work-dir", str(tmp_path / "run")], env)
    assert "loss_crd_pts_neck" in proc.stdout + proc.stderr
    assert (tmp_path / "run" / "iter_1.pth").is_file()


# ---------------------------------------------------------------------------------------------
# 3. The nuScenes recipe's dry run: the whole chain on synthetic data at a tiny scale


@pytest.mark.slow
@needs_checkout_files("tools/create_data.py", "tools/test.py", "tools/dataset_converters/create_gt_database.py")
def test_nuscenes_recipe_dry_run(tmp_path, env):
    proc = run([sys.executable, "pipelines/nuscenes/run.py", "--dry-run", "--work-dir", str(tmp_path)], env)
    out = proc.stdout + proc.stderr
    for step in ("prepare", "checkpoint", "extract", "train", "evaluate"):
        assert f"[nuscenes] {step}" in out, out[-3000:]
    assert (tmp_path / "summary.json").is_file()
