"""Augmentation replay: K augmented teacher views per sample, replayed exactly for the student.

View v (1..K) of dataset index i is the config's *training* pipeline run under one seed derived
from (dataset fingerprint, i, v); every RNG a transform may use (Python's `random`, numpy's global
RNG, torch's CPU RNG) is seeded for that one call and restored after, so the surrounding run's
randomness is untouched. Extraction stores the teacher's pooled vector of each view plus a digest
of the augmented input; training wraps the base dataset in `ReplayViewsDataset`, which shows each
sample's K views once per K epochs, runs the student's (identical) pipeline under the same seed and tags
the data sample with the view id and digest, so the distiller looks up row [index, view] and can
prove the student saw the teacher's input. View 0 is the un-augmented (test pipeline) sample.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from mmdet3d.registry import DATASETS

from .errors import ConfigError, StoreMismatch
from .pipeline import reset_replay_state, seeded_rngs  # noqa: F401  (seeded_rngs: re-exported)

SEED_SCHEME = "uint32 big-endian of sha256('<dataset sha256>:<index>:<view>')[:4]"
VIEW_META = "replay_view"
DIGEST_META = "replay_digest"


def view_seed(fingerprint: str, index: int, view: int) -> int:
    """The seed of view `view` of dataset index `index` (SEED_SCHEME)."""
    digest = hashlib.sha256(f"{fingerprint}:{int(index)}:{int(view)}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def pick_view(run_seed: int, epoch: int, index: int, num_views: int) -> int:
    """The view (1..K) a sample shows in an epoch: each of its K views once in every K epochs, in an
    order fixed by (run seed, index, cycle). Drawing with replacement showed a sample only ~64% of its
    views over K epochs, and any repeat is an augmentation a plain run would have drawn fresh."""
    cycle, slot = divmod(int(epoch), int(num_views))
    order = sorted(range(1, int(num_views) + 1), key=lambda v: hashlib.sha256(
        f"pick:{int(run_seed)}:{cycle}:{int(index)}:{v}".encode()).digest())
    return order[slot]


def repeated_views_warning(num_views: int, passes: int) -> str | None:
    """What a run of `passes` epochs over K views loses, or None when every epoch has a fresh view."""
    if passes <= num_views:
        return None
    return (f"distillation: {passes} passes over the data but {num_views} augmented views per sample: each view is "
            f"shown up to {-(-passes // num_views)} times, so a sample has {num_views} distinct augmentations where "
            f"a plain augmented run draws {passes}. Extract the store with --views {passes} or more for the same "
            "variety.")


# Camera images are left out of the digest: a LiDAR student replaying a fused teacher's views never
# loads them. What it does load (points) and the GT pin the view; the images of a view follow from
# the same pipeline record and seed.
UNDIGESTED_INPUTS = ("img",)


def input_digest(packed: dict) -> int:
    """int64 digest of an augmented sample: every input tensor but the camera images, plus the GT
    boxes and labels."""
    h = hashlib.sha256()
    for key in sorted(k for k in packed["inputs"] if k not in UNDIGESTED_INPUTS):
        value = packed["inputs"][key]
        if isinstance(value, torch.Tensor):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    gt = getattr(packed.get("data_samples"), "gt_instances_3d", None)
    if gt is not None:
        for key in ("bboxes_3d", "labels_3d"):
            if key in gt:
                value = gt[key]
                value = getattr(value, "tensor", value)
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "big", signed=True)


def augmented_sample(dataset, index: int, view: int, fingerprint: str) -> dict:
    """Base dataset sample `index` through its (training) pipeline under the seed of `view`, tagged."""
    seed = view_seed(fingerprint, index, view)
    with seeded_rngs(seed):
        # Transforms with cross-call state (ObjectSample's database sampler) restart from the seed,
        # so a view never depends on what this process sampled before.
        reset_replay_state(dataset.pipeline, seed)
        packed = dataset.prepare_data(index)
    if packed is None:
        raise ConfigError(
            f"the train pipeline dropped dataset index {index} (view {view}): augmentation replay needs "
            "every view to produce a sample; set filter_empty_gt=False on the train dataset."
        )
    packed["data_samples"].set_metainfo({VIEW_META: int(view), DIGEST_META: input_digest(packed)})
    return packed


# ---------------------------------------------------------------------------------------------
# The pipeline the views were made with


def pipeline_record(pipeline: Sequence[dict]) -> dict:
    """JSON text and sha256 of a train pipeline config, with Pack3DDetInputs' meta_keys left out
    (training adds sample_idx/token to them; they change no point or box). Record the config before
    building from it, or pass it anyway: what building adds (ObjectSample gives its db_sampler the
    default `type='DataBaseSampler'`) is filled in here, so a built and an unbuilt config agree."""
    steps = []
    for step in copy.deepcopy(list(pipeline)):
        step = dict(step)
        step["type"] = str(step.get("type", "")).split(".")[-1]
        if step["type"] == "Pack3DDetInputs":
            step.pop("meta_keys", None)
        if isinstance(step.get("db_sampler"), dict):
            step["db_sampler"] = {"type": "DataBaseSampler", **step["db_sampler"]}
        steps.append(step)
    text = json.dumps(steps, sort_keys=True, default=str)
    return {"pipeline": json.loads(text), "pipeline_sha256": hashlib.sha256(text.encode()).hexdigest()}


def _without_images(steps: Sequence[dict]) -> list[dict]:
    """A pipeline record without its camera-image steps and packed `img` (what a LiDAR student lacks)."""
    from .inputs import IMAGE_STEPS

    kept = []
    for step in steps:
        if step.get("type") in IMAGE_STEPS:
            continue
        if step.get("type") == "Pack3DDetInputs" and "keys" in step:
            step = {**step, "keys": [k for k in step["keys"] if k != "img"]}
        kept.append(step)
    return kept


def check_same_pipeline(recorded: dict, student_pipeline: Sequence[dict], *, where: str) -> None:
    """Refuse when the student's train pipeline is not the one the views were made with. A student
    without the teacher's camera steps (a LiDAR student of a fused teacher) matches when everything
    else is the same: an image step that drew random numbers before a LiDAR transform would change
    the LiDAR input, which each view's input digest then refuses."""
    mine = pipeline_record(student_pipeline)
    if mine["pipeline_sha256"] == recorded.get("pipeline_sha256"):
        return
    theirs_lidar = _without_images(recorded.get("pipeline") or [])
    if theirs_lidar != recorded.get("pipeline") and _without_images(mine["pipeline"]) == theirs_lidar:
        return
    theirs = recorded.get("pipeline") or []
    lines = []
    matcher = difflib.SequenceMatcher(a=[json.dumps(s, sort_keys=True) for s in theirs],
                                      b=[json.dumps(s, sort_keys=True) for s in mine["pipeline"]])
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            continue
        for old, new in zip(theirs[a0:a1], mine["pipeline"][b0:b1], strict=False):  # extras listed below
            if old.get("type") == new.get("type"):
                keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                lines.append(f"{new['type']}: " + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys))
            else:
                lines.append(f"{old.get('type')} replaced by {new.get('type')}")
        extra_a, extra_b = theirs[a0 + (b1 - b0):a1], mine["pipeline"][b0 + (a1 - a0):b1]
        lines += [f"{s.get('type')} removed" for s in extra_a] + [f"{s.get('type')} added" for s in extra_b]
    raise StoreMismatch(
        f"the student's train pipeline differs from the one the views in {where} were made with: "
        + "; ".join(lines or ["(same steps, different order)"])
        + ". Use the teacher's train pipeline in the student config (a LiDAR student of a fused teacher: its "
        "LiDAR steps, in the same order), or train with augmentation='keep' (pooled CRD) or 'warp' (spatial maps)."
    )


# ---------------------------------------------------------------------------------------------
# Training side


@DATASETS.register_module()
class ReplayViewsDataset:
    """Wraps the base train dataset: item i is view `pick_view(seed, epoch, i, K)` of sample i,
    produced under that view's extraction seed. Index-preserving, so CBGS/Repeat may wrap it.

    The epoch lives in shared memory so persistent loader workers see `set_epoch` from the main
    process (`bevcache.hooks.DistillationHook` calls it before every epoch). `dataset[(i, v)]` asks for a view.
    """

    def __init__(self, dataset: dict | Any, num_views: int | None = None, fingerprint: str | None = None,
                 seed: int = 0, pipeline_cfg: list | None = None) -> None:
        if num_views is not None and int(num_views) < 1:
            raise ConfigError(f"ReplayViewsDataset needs num_views >= 1. Got {num_views}.")
        # The pipeline as configured, before building can add keys to it (ObjectSample's db_sampler);
        # a built dataset comes with its config's pipeline (`pipeline_cfg`), or none to compare.
        if isinstance(dataset, dict):
            pipeline_cfg = dataset.get("pipeline") or []
        self.pipeline_cfg = None if pipeline_cfg is None else copy.deepcopy(list(pipeline_cfg))
        self.dataset = DATASETS.build(dataset) if isinstance(dataset, dict) else dataset
        self.num_views = None if num_views is None else int(num_views)  # None: the distiller binds the store's K
        if fingerprint is None:  # the views' seeds derive from the ordered tokens, as in extraction
            from .data import dataset_identity
            from .store import fingerprint_tokens

            fingerprint = fingerprint_tokens(dataset_identity(self.dataset)[0])["sha256"]
        self.fingerprint = str(fingerprint)
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def bind(self, *, num_views: int, recorded: dict | None, where: str) -> None:
        """Take the store's K and prove this pipeline is the one its views were made with
        (the distiller calls it at before_train, before any loader worker starts)."""
        if self.num_views is not None and self.num_views != int(num_views):
            raise StoreMismatch(f"ReplayViewsDataset has num_views={self.num_views} but {where} holds {num_views} "
                                "views per sample; drop num_views from the wrapper (it comes from the store).")
        self.num_views = int(num_views)
        if recorded is not None and self.pipeline_cfg is not None:
            check_same_pipeline(recorded, self.pipeline_cfg, where=where)

    def __setstate__(self, state: dict) -> None:
        """A copy or unpickled instance keeps the epoch in shared memory. mmengine's Runner deep-copies
        the loader config, dataset included, before building the loader; a plain copy made the epoch a
        private tensor, so the loader workers never saw an epoch after the first and showed one view
        throughout. (Torch's pickler for spawned workers sends the shared tensor itself: kept as is.)"""
        self.__dict__.update(state)
        if not self._epoch.is_shared():
            self._epoch = self._epoch.clone().share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        if self.num_views is None:
            raise ConfigError("ReplayViewsDataset has no num_views yet: a CRDDistiller with augmentation='replay' "
                              "(through DistillationHook) sets it from the store, or pass num_views=K.")
        index, view = key if isinstance(key, tuple) else (key, pick_view(self.seed, self.epoch, key, self.num_views))
        return augmented_sample(self.dataset, int(index), int(view), self.fingerprint)

    def __getattr__(self, name: str) -> Any:  # metainfo, get_data_info, get_cat_ids, full_init, ...
        if name in ("dataset", "_epoch") or name.startswith("__"):  # never the wrapped dataset's protocols
            raise AttributeError(name)
        return getattr(self.dataset, name)


def find_replay_dataset(dataset: Any) -> ReplayViewsDataset | None:
    """The ReplayViewsDataset inside (or being) a possibly wrapped dataset."""
    from .data import find_wrapper

    return find_wrapper(dataset, ReplayViewsDataset)
