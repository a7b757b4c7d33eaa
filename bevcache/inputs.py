"""Inputs the online teacher reads and the student does not (e.g. a fused camera + LiDAR teacher
beside a LiDAR student): one loader, one augmentation draw, both models fed from the same batch.

`add_teacher_inputs` puts the teacher's input-loading steps (camera images, their test-time
processing) into the student's train pipeline just before `Pack3DDetInputs`, after every random
LiDAR transform, so the draws the student sees are the ones it would see alone; the base dataset
gets the teacher's `modality` and `data_prefix` so the image paths resolve. The distiller then
hands the student its own inputs only (`CRDDistiller(teacher_inputs=...)`): the student never sees
`img`. The cached run needs none of this: its loader never opens an image.
"""

from __future__ import annotations

import copy
from typing import Any

from .data import test_pipeline, unwrap_dataset_cfg
from .errors import ConfigError

# Transforms that load or process camera images (mmdet3d, BEVFusion's project).
IMAGE_STEPS = ("LoadMultiViewImageFromFiles", "BEVLoadMultiViewImageFromFiles", "LoadImageFromFile",
               "LoadImageFromFileMono3D", "ImageAug3D", "MultiViewWrapper", "PhotoMetricDistortion3D", "GridMask")


def _name(step: dict) -> str:
    kind = step.get("type", "")
    return (kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))).split(".")[-1]


def _pack(pipeline: list) -> dict | None:
    return next((s for s in pipeline if _name(s) == "Pack3DDetInputs"), None)


def teacher_only_keys(teacher: list, student: list) -> tuple[str, ...]:
    """Inputs the teacher's (test) pipeline loads and the student's train pipeline does not. Decided by
    the loading steps, not by Pack3DDetInputs' keys: BEVFusion-L's LiDAR config packs 'img' too
    (Pack skips absent keys), although nothing loads an image."""
    teacher_loads = any(_name(s) in IMAGE_STEPS for s in teacher)
    student_loads = any(_name(s) in IMAGE_STEPS for s in student)
    return ("img",) if teacher_loads and not student_loads else ()


def add_teacher_inputs(cfg: Any, teacher_cfg: Any) -> tuple[str, ...]:
    """Make the student's train loader also load what the teacher reads; returns those input keys."""
    teacher_pipeline = test_pipeline(teacher_cfg)  # a deep copy
    base = unwrap_dataset_cfg(cfg.train_dataloader.dataset)
    keys = teacher_only_keys(teacher_pipeline, list(base.get("pipeline") or []))
    if not keys:
        return ()
    steps = [s for s in teacher_pipeline if _name(s) in IMAGE_STEPS]
    if not steps:
        raise ConfigError(f"the online teacher's test pipeline packs {list(keys)} but no known step loads them "
                          f"({list(IMAGE_STEPS)}): add the loading step to the teacher's test pipeline.")
    teacher_base = unwrap_dataset_cfg(teacher_cfg.train_dataloader.dataset)
    for key in ("modality", "data_prefix"):  # where the images are: the teacher's dataset says
        if teacher_base.get(key) is not None:
            base[key] = copy.deepcopy(teacher_base[key])
    pipeline = list(base["pipeline"])
    pack = _pack(pipeline)
    if pack is None:
        raise ConfigError("the student's train pipeline has no Pack3DDetInputs step to pack the teacher's inputs into.")
    at = pipeline.index(pack)
    pack["keys"] = [*pack.get("keys", []), *[k for k in keys if k not in pack.get("keys", [])]]
    teacher_meta = (_pack(teacher_pipeline) or {}).get("meta_keys")
    if teacher_meta is not None and pack.get("meta_keys") is not None:  # camera matrices travel in metainfo
        pack["meta_keys"] = tuple(pack["meta_keys"]) + tuple(k for k in teacher_meta if k not in pack["meta_keys"])
    base["pipeline"] = pipeline[:at] + steps + pipeline[at:]
    return keys
