"""Shared fixtures: a tiny synthetic nuScenes data root and configs pointed at it."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
os.environ.setdefault("OMP_NUM_THREADS", "2")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Opt-in `-n 2`: two xdist workers share the 2 cores, one intra-op thread each, subprocesses included.
    os.environ["OMP_NUM_THREADS"] = "1"
# Idle OpenMP threads sleep instead of spinning: subprocess tests (CLI, torchrun) share 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@contextlib.contextmanager
def one_intra_op_thread():
    """One torch intra-op thread here and (OMP_NUM_THREADS) in child processes; both restored after."""
    import torch

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """12 train / 4 val synthetic samples (session-wide; tests must not modify it)."""
    from bevcache.synth import generate

    root = tmp_path_factory.mktemp("synthetic-nus")
    generate(root, num_train=12, num_val=4, seed=0)
    return root


@pytest.fixture(scope="session")
def other_data_root(tmp_path_factory) -> Path:
    """Same size, different seed: a different dataset (different tokens)."""
    from bevcache.synth import generate

    root = tmp_path_factory.mktemp("synthetic-nus-other")
    generate(root, num_train=12, num_val=4, seed=1)
    return root


def tiny_cfg(name: str, data_root: Path, *, batch_size: int = 2, workers: int = 0):
    """A tiny config with its data root replaced and a small, worker-free loader."""
    from bevcache.data import set_data_root
    from bevcache.runtime import load_config, setup_runtime

    setup_runtime()
    cfg = load_config(CONFIGS / name)
    set_data_root(cfg, str(data_root))
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[key].batch_size = batch_size
        cfg[key].num_workers = workers
        cfg[key].persistent_workers = workers > 0
    return cfg


def _find_mmdet3d_checkout() -> Path | None:
    """An mmdetection3d checkout with projects/BEVFusion: $MMDET3D_ROOT, else ../mmdetection3d."""
    for root in (os.environ.get("MMDET3D_ROOT"), REPO.parent / "mmdetection3d"):
        if root and (Path(root) / "projects" / "BEVFusion" / "bevfusion" / "__init__.py").is_file():
            return Path(root).resolve()
    return None


MMDET3D_CHECKOUT = _find_mmdet3d_checkout()


def needs_checkout_files(*relative: str):
    """Skip, saying why, without an mmdetection3d checkout or when it lacks any of these files (e.g.
    a sparse checkout of projects/ without tools/)."""
    if MMDET3D_CHECKOUT is None:
        return pytest.mark.skip(reason="needs an mmdetection3d v1.4 checkout (projects/BEVFusion is not in the "
                                       "wheel): set MMDET3D_ROOT or clone it to ../mmdetection3d beside this repository")
    missing = [r for r in relative if not (MMDET3D_CHECKOUT / r).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"the mmdetection3d checkout {MMDET3D_CHECKOUT} lacks {missing}; "
                                                    "use a full clone of mmdetection3d v1.4")


def iteration_run(cfg, *, work_dir: str | Path, iters: int, batch_size: int = 2, workers: int = 0,
                  seed: int = 0, checkpoint_interval: int | None = None, shuffle: bool = True):
    """A Runner config turned into a short iteration run for tests and benchmarks: `iters` steps
    (bevcache.schedule, as `bevcache train --max-iters`) at constant LR, no validation, a log line
    every step, checkpoints every `checkpoint_interval` steps (none without it)."""
    from bevcache.schedule import NEVER, set_run_length

    cfg.work_dir = str(work_dir)
    set_run_length(cfg, max_iters=iters)
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=checkpoint_interval or NEVER,
                                        by_epoch=False, save_last=checkpoint_interval is not None)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    cfg.log_processor = dict(type="LogProcessor", window_size=1, by_epoch=False)
    cfg.train_dataloader.update(batch_size=batch_size, num_workers=workers, persistent_workers=False,
                                sampler=dict(type="InfiniteSampler", shuffle=shuffle))
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.test_dataloader = cfg.test_cfg = cfg.test_evaluator = None
    cfg.randomness = dict(seed=seed, deterministic=False)
    return cfg


def run_command(args: list, env: dict, *, ok: bool = True, timeout: float = 540):
    """A command in a subprocess from the repository root; with ok=True a failure fails the test
    with the end of its stderr."""
    import subprocess

    proc = subprocess.run([str(a) for a in args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if ok and proc.returncode:
        pytest.fail(f"{' '.join(map(str, args[2:]))} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def assert_cached_equals_online(cached_runner, cached_losses: list, online_runner, online_losses: list) -> None:
    """Per-iteration losses (CRD included) and the trained student weights of a cached run equal the
    online reference's; the cached run built no teacher."""
    import torch

    for a, b in zip(cached_losses, online_losses, strict=True):
        assert set(a) == set(b) and "loss_crd_pts_neck" in a
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, cached_losses, online_losses)
    s_cached, s_online = cached_runner.model.student_state_dict(), online_runner.model.student_state_dict()
    for key, value in s_cached.items():
        torch.testing.assert_close(value, s_online[key], rtol=1e-5, atol=1e-6)
    assert cached_runner.model.teacher is None


def bevcache_cmd(*args: str) -> list[str]:
    """The `bevcache` console script's own start (bevcache_cli: light until a command builds models),
    so the tests run what users run and `info`/`verify`/`--help` skip importing torch and mmdet3d."""
    return [sys.executable, "-m", "bevcache_cli", *args]


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> str:
    """Random but fixed tiny-teacher weights as a checkpoint (BN stats perturbed so eval differs from init)."""
    import torch
    from mmdet3d.registry import MODELS

    from bevcache.runtime import load_config, setup_runtime

    setup_runtime()
    torch.manual_seed(123)
    model = MODELS.build(load_config(CONFIGS / "tiny_teacher.py").model)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {}}, path)
    return str(path)


SPATIAL_GRID = 16  # the spatial store's BEV grid for pts_neck (the tiny teacher's neck is 64 x 64)
SPATIAL_VIEWS = 2


@pytest.fixture(scope="session")
def spatial_store(data_root, teacher_ckpt, tmp_path_factory) -> str:
    """The tiny teacher's pts_neck pooled and as 16 x 16 maps, with 2 augmented views per sample
    (session-wide, read-only)."""
    from bevcache.extract import ExtractOptions, extract

    out = tmp_path_factory.mktemp("spatial-views-store") / "features.zarr"
    extract(ExtractOptions(config=str(CONFIGS / "tiny_teacher.py"), checkpoint=teacher_ckpt, out=str(out),
                           data_root=str(data_root), batch_size=3, num_workers=0, chunk_rows=4,
                           spatial=f"pts_neck={SPATIAL_GRID}", views=SPATIAL_VIEWS, progress=False))
    return str(out)


@pytest.fixture(scope="session")
def fp32_store(data_root, teacher_ckpt, tmp_path_factory) -> str:
    """The tiny teacher's pooled pts_neck over the 12-sample data root, float32 (session-wide, read-only)."""
    from bevcache.extract import ExtractOptions, extract

    out = tmp_path_factory.mktemp("train-store") / "features.zarr"
    extract(ExtractOptions(config=str(CONFIGS / "tiny_teacher.py"), checkpoint=teacher_ckpt, out=str(out),
                           data_root=str(data_root), batch_size=3, num_workers=0, chunk_rows=4, dtype="float32",
                           progress=False))
    return str(out)
