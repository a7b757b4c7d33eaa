"""The shipped configs build from mmdet3d's registries and run loss/backward/predict on CPU."""

from __future__ import annotations

import pytest
import torch
from mmengine.dataset import pseudo_collate

from bevcache.data import build_base_dataset
from bevcache.features import LayerRecorder

from .conftest import CONFIGS, tiny_cfg


@pytest.mark.parametrize("name, neck_channels", [("tiny_teacher.py", 512), ("tiny_student.py", 256)])
def test_tiny_config_trains_and_predicts(data_root, name, neck_channels):
    from mmdet3d.registry import MODELS

    cfg = tiny_cfg(name, data_root)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    dataset = build_base_dataset(cfg, "train")
    batch = model.data_preprocessor(pseudo_collate([dataset[0], dataset[1]]), True)
    with LayerRecorder(model, ["pts_neck"]) as rec:
        losses = model(**batch, mode="loss")
        neck = rec.outputs["pts_neck"]
    assert isinstance(neck, (list, tuple)) and neck[0].shape == (2, neck_channels, 64, 64)
    total = sum(v.sum() if isinstance(v, torch.Tensor) else sum(v) for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total)
    total.backward()
    assert model.pts_neck.deblocks[0][0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        val = build_base_dataset(cfg, "val")
        results = model(**model.data_preprocessor(pseudo_collate([val[0]]), False), mode="predict")
    assert results[0].pred_instances_3d.bboxes_3d.tensor.shape[1] == 9


def test_student_is_smaller_than_teacher(data_root):
    from mmdet3d.registry import MODELS

    sizes = {n: sum(p.numel() for p in MODELS.build(tiny_cfg(n, data_root).model).parameters())
             for n in ("tiny_teacher.py", "tiny_student.py")}
    assert sizes["tiny_student.py"] < sizes["tiny_teacher.py"] / 2


def test_distill_section_is_complete():
    from bevcache.runtime import load_config
    from bevcache.train import distill_setting_names

    distill = load_config(CONFIGS / "tiny_student.py").distill
    assert set(distill) <= set(distill_setting_names())


def _augmentation_settings(path) -> list:
    """Every `augmentation=` a config file itself sets (distill section or CRDDistiller model)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.keyword) and node.arg == "augmentation" and isinstance(node.value, ast.Constant):
            found.append(node.value.value)
    return found


def test_shipped_configs_follow_the_readme_default():
    """The README states the augmentation default; the distiller's signature holds it; every shipped
    config either leaves it alone or sets that value (replay variants say so in their name)."""
    import inspect
    import re

    from bevcache.distiller import CRDDistiller

    readme = (CONFIGS.parent / "README.md").read_text()
    stated = set(re.findall(r"default `augmentation='(\w+)'`", readme))
    default = inspect.signature(CRDDistiller.__init__).parameters["augmentation"].default
    assert stated == {default}, f"README states {stated}, the distiller's default is {default!r}"
    offenders = {}
    for path in sorted(CONFIGS.rglob("*.py")):
        values = [v for v in _augmentation_settings(path) if v != default]
        if values and not ("replay" in path.stem and set(values) == {"replay"}):
            offenders[str(path.relative_to(CONFIGS))] = values
    assert not offenders, f"shipped configs override the documented default: {offenders}"
