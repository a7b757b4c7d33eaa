"""One config form, any launcher: mmdet3d's own tools/train.py, Runner.from_cfg and `bevcache train`
train configs/tiny_student_crd.py with identical losses; mmdet3d's tools/test.py evaluates the
distiller checkpoint; slurm is simulated for two local processes."""

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


def test_three_launchers_give_identical_losses(data_root, fp32_store, tmp_path):
    import torch
    from mmengine.config import Config
    from mmengine.runner import Runner

    # The subprocesses use this process's intra-op thread count (2, or 1 under xdist): float sums of
    # another thread count differ in the last bits, which six steps of training amplify.
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    # (a) mmdet3d's own training script, from the installed wheel, in its own process
    work_a = tmp_path / "tools_train"
    result = subprocess.run([sys.executable, str(MIM_TOOLS / "train.py"), CRD_CONFIG, "--cfg-options",
                             *short_options(data_root, fp32_store, work_a)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # (b) Runner.from_cfg in this process
    work_b = tmp_path / "from_cfg"
    cfg = Config.fromfile(CRD_CONFIG)
    from bevcache.runtime import parse_cfg_options

    cfg.merge_from_dict(parse_cfg_options(short_options(data_root, fp32_store, work_b)))
    # mmengine keeps one visualizer per name and process: an earlier test's would write elsewhere
    cfg.visualizer.name = f"visualizer-{work_b}"
    Runner.from_cfg(cfg).train()
    # (c) bevcache train
    work_c = tmp_path / "bevcache_train"
    result = subprocess.run(bevcache_cmd("train", "--student", CRD_CONFIG, "--cfg-options",
                                         *short_options(data_root, fp32_store, work_c)),
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    losses = [logged_losses(w) for w in (work_a, work_b, work_c)]
    assert len(losses[0]) == ITERS and "loss_crd_pts_neck" in losses[0][0]
    for other in losses[1:]:
        assert len(other) == ITERS
        for a, b in zip(losses[0], other, strict=True):
            assert set(a) == set(b)
            for key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, losses)
    for work in (work_a, work_b, work_c):  # every launcher got the export hook
        assert (work / "student_weights.pth").is_file()

    # mmdet3d's own tools/test.py evaluates the distiller checkpoint: the student's predictions
    ckpt = work_a / "epoch_1.pth"
    result = subprocess.run([sys.executable, str(MIM_TOOLS / "test.py"), CRD_CONFIG, str(ckpt), "--cfg-options",
                             *short_options(data_root, fp32_store, tmp_path / "tools_test")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NuScenes metric/pred_instances_3d_NuScenes/mAP" in result.stdout + result.stderr


SLURM_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
from mmengine.config import Config
from bevcache.runtime import init_distributed
import torch.distributed as dist
init_distributed('slurm', Config(dict(env_cfg=dict(dist_cfg=dict(backend='gloo', timeout=60)))))
t = __import__('torch').tensor([dist.get_rank() + 1.0])
dist.all_reduce(t)
print('rank', dist.get_rank(), 'of', dist.get_world_size(), 'sum', float(t), 'timeout-ok', flush=True)
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
