"""One config form, any launcher: mmdet3d's own tools/train.py, Runner.from_cfg and `bevcache train`
train configs/tiny_student_crd.py (pooled CRD) and configs/tiny_student_spatial_replay.py (replayed
views, spatial maps read in the loader workers) with identical losses, and so do Runner.from_cfg and
`bevcache train` under torchrun's `--launcher pytorch`; mmdet3d's tools/test.py evaluates the distiller checkpoint; slurm is
simulated for two local processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mmdet3d
import pytest

from .conftest import CONFIGS, REPO, bevcache_cmd

CRD_CONFIG = str(CONFIGS / "tiny_student_crd.py")
SPATIAL_REPLAY_CONFIG = str(CONFIGS / "tiny_student_spatial_replay.py")
MIM_TOOLS = Path(mmdet3d.__file__).parent / ".mim" / "tools"
ITERS = 6  # one epoch of the 12-sample data root at batch 2


def short_options(data_root: Path, store: str, work_dir: Path) -> list[str]:
    """--cfg-options making the config form a one-epoch (6-iteration), worker-free, validation-free run."""
    root = str(data_root).rstrip("/") + "/"
    return [
        f"model.cache={store}", f"train_dataloader.dataset.data_root={root}",
        "train_dataloader.batch_size=2", "train_dataloader.num_workers=0", "train_dataloader.persistent_workers=False",
        "train_dataloader.sampler.shuffle=True",
        "train_cfg.max_epochs=1", "train_cfg.val_interval=1000", "param_scheduler=[]",
        "default_hooks.logger.interval=1", "log_processor.window_size=1", "randomness.seed=7",
        "val_dataloader.num_workers=0", "val_dataloader.persistent_workers=False",
        f"val_dataloader.dataset.data_root={root}", f"val_evaluator.data_root={root}",
        f"val_evaluator.ann_file={root}nuscenes_infos_val.pkl",
        "test_dataloader.num_workers=0", "test_dataloader.persistent_workers=False",
        f"test_dataloader.dataset.data_root={root}", f"test_evaluator.data_root={root}",
        f"test_evaluator.ann_file={root}nuscenes_infos_val.pkl", f"work_dir={work_dir}",
    ]


def logged_losses(work_dir: Path) -> list[dict]:
    """Per-iteration loss entries of the run's scalars.json (mmengine's LocalVisBackend)."""
    files = sorted(work_dir.glob("*/vis_data/scalars.json"))
    assert files, f"no scalars.json under {work_dir}"
    rows = [json.loads(line) for line in files[-1].read_text().splitlines()]
    return [{k: v for k, v in row.items() if k.startswith("loss")} for row in rows if "loss" in row]


def _env() -> dict:
    """The subprocesses use this process's intra-op thread count (2, or 1 under xdist): float sums of
    another thread count differ in the last bits, which six steps of training amplify."""
    import torch

    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": str(torch.get_num_threads())}


def assert_same_losses(losses: list[list[dict]], expect: set[str]) -> None:
    assert len(losses[0]) == ITERS and expect <= set(losses[0][0]), losses[0][:1]
    for other in losses[1:]:
        assert len(other) == ITERS
        for a, b in zip(losses[0], other, strict=True):
            assert set(a) == set(b)
            for key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, losses)


def _check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


@pytest.mark.parametrize("form", ["pooled", "spatial_replay"])
def test_three_launchers_give_identical_losses(form, data_root, fp32_store, spatial_store, tmp_path):
    """No wrapper in either config: DistillationHook adds ReplayViewsDataset and TeacherRowsDataset
    whichever entry point built the Runner."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    from bevcache.runtime import parse_cfg_options

    config, store = (CRD_CONFIG, fp32_store) if form == "pooled" else (SPATIAL_REPLAY_CONFIG, spatial_store)
    env = _env()
    # (a) mmdet3d's own training script, from the installed wheel, in its own process
    work_a = tmp_path / "tools_train"
    _check(subprocess.run([sys.executable, str(MIM_TOOLS / "train.py"), config, "--cfg-options",
                           *short_options(data_root, store, work_a)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600))
    # (b) Runner.from_cfg in this process
    work_b = tmp_path / "from_cfg"
    cfg = Config.fromfile(config)
    cfg.merge_from_dict(parse_cfg_options(short_options(data_root, store, work_b)))
    # mmengine keeps one visualizer per name and process: an earlier test's would write elsewhere
    cfg.visualizer.name = f"visualizer-{work_b}"
    Runner.from_cfg(cfg).train()
    # (c) bevcache train
    work_c = tmp_path / "bevcache_train"
    _check(subprocess.run(bevcache_cmd("train", "--student", config, "--cfg-options",
                                       *short_options(data_root, store, work_c)),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600))

    expect = {"loss_crd_pts_neck"} | ({"loss_spatial_pts_neck"} if form == "spatial_replay" else set())
    assert_same_losses([logged_losses(w) for w in (work_a, work_b, work_c)], expect)
    for work in (work_a, work_b, work_c):  # every launcher got the export hook
        assert (work / "student_weights.pth").is_file()
    if form == "spatial_replay":
        return
    # mmdet3d's own tools/test.py evaluates the distiller checkpoint: the student's predictions
    ckpt = work_a / "epoch_1.pth"
    result = subprocess.run([sys.executable, str(MIM_TOOLS / "test.py"), CRD_CONFIG, str(ckpt), "--cfg-options",
                             *short_options(data_root, fp32_store, tmp_path / "tools_test")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    _check(result)
    assert "NuScenes metric/pred_instances_3d_NuScenes/mAP" in result.stdout + result.stderr


RUNNER_DDP_SCRIPT = """
import sys
import torch.distributed as dist
from mmengine.config import Config
from mmengine.runner import Runner
sys.path.insert(0, {repo!r})
from bevcache.runtime import parse_cfg_options
# What tools/train.py --launcher pytorch does, but with gloo: mmengine's init_dist sets a CUDA device
# first, which a CPU build of torch lacks (the Runner reuses an existing group).
dist.init_process_group("gloo")
cfg = Config.fromfile(sys.argv[1])
cfg.merge_from_dict(parse_cfg_options(sys.argv[2:]))
cfg.launcher = "pytorch"
cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False)
Runner.from_cfg(cfg).train()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_runner_from_cfg_under_torchrun_equals_bevcache_train_under_torchrun(data_root, spatial_store, tmp_path):
    """Two processes, `--launcher pytorch`, replay and spatial maps: the lazily sized embeddings
    (synchronised after the first batch) and the dataset wrappers need nothing from `bevcache train`."""
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2"]
    env = {**_env(), "OMP_NUM_THREADS": "1"}
    port = 29400 + os.getpid() % 150
    script = tmp_path / "runner_ddp.py"
    script.write_text(RUNNER_DDP_SCRIPT.format(repo=str(REPO)))
    work_b, work_c = tmp_path / "from_cfg", tmp_path / "bevcache_train"
    _check(subprocess.run([*torchrun, "--master-port", str(port), str(script), SPATIAL_REPLAY_CONFIG,
                           *short_options(data_root, spatial_store, work_b)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600))
    _check(subprocess.run([*torchrun, "--master-port", str(port + 150), "-m", "bevcache.cli", "train", "--student",
                           SPATIAL_REPLAY_CONFIG, "--launcher", "pytorch", "--cfg-options",
                           *short_options(data_root, spatial_store, work_c)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600))
    losses = [logged_losses(w) for w in (work_b, work_c)]
    assert len(losses[0]) == len(losses[1]) == ITERS // 2  # each rank takes half the epoch
    assert {"loss_crd_pts_neck", "loss_spatial_pts_neck"} <= set(losses[0][0])
    for a, b in zip(losses[0], losses[1], strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5) for k in a), losses


SLURM_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
from mmengine.config import Config
from bevcache.runtime import init_distributed, leave_process_group
import torch.distributed as dist
init_distributed('slurm', Config(dict(env_cfg=dict(dist_cfg=dict(backend='gloo', timeout=60)))))
t = __import__('torch').tensor([dist.get_rank() + 1.0])
dist.all_reduce(t)
print('rank', dist.get_rank(), 'of', dist.get_world_size(), 'sum', float(t), 'timeout-ok', flush=True)
leave_process_group()
"""


def test_slurm_launcher_runs_two_simulated_tasks_on_cpu(tmp_path):
    script = tmp_path / "slurm_job.py"
    script.write_text(SLURM_SCRIPT.format(repo=str(REPO)))
    port = str(29700 + os.getpid() % 200)
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_NODELIST="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert sorted(o.split()[1] for o, _ in outs) == ["0", "1"]
    assert all("of 2 sum 3.0" in o for o, _ in outs)


def test_a_launcher_without_its_environment_is_one_line(data_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))}
    result = subprocess.run(bevcache_cmd("train", "--student", str(CONFIGS / "tiny_student.py"), "--launcher", "slurm",
                                         "--data-root", str(data_root), "--work-dir", str(tmp_path / "w")),
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: --launcher slurm: the environment lacks")
