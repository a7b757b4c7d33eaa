"""Run by test_train under torchrun: 3 DDP steps of cached CRD (widths from the first batch), then dump
each rank's CRD state."""

import sys
from pathlib import Path

import torch
from mmengine.runner import Runner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bevcache.train import TrainOptions, build_train_config  # noqa: E402
from tests.test_train import short_run  # noqa: E402

data_root, store, out = sys.argv[1:4]
cfg = build_train_config(TrainOptions(student="configs/tiny_student.py", data_root=data_root, cache=store,
                                      launcher="pytorch"))
assert "student_dims" not in cfg.model and "teacher_dims" not in cfg.model  # nothing probed before DDP
cfg = short_run(cfg, Path(out) / "work", 3)
runner = Runner.from_cfg(cfg)
crd = runner.model.module.crd["pts_neck"] if hasattr(runner.model, "module") else runner.model.crd["pts_neck"]
if runner.rank == 0:
    torch.save({k: v.clone() for k, v in crd.named_buffers()}, Path(out) / "crd_initial.pt")  # embeds: unsized
runner.train()
torch.save({k: v.clone() for k, v in crd.state_dict().items()}, Path(out) / f"crd_rank{runner.rank}.pt")
