"""Dataset and index plumbing: which rows a store holds, and which row each training sample is.

Row i of a store is index i of the *base* dataset (after mmengine's filtering, before wrappers).
mmengine's `BaseDataset.get_data_info(i)` stamps `sample_idx = i` on every sample, and
`Pack3DDetInputs` carries `sample_idx` and `token` into each data sample's metainfo; wrappers
(CBGS, Repeat, ClassBalanced) call the base dataset with the base index, so the index that reaches
the loss is the row, whatever the loader index, shuffling or worker count. The token is checked
against the store's record for every sample, so a wrong lookup is an error, never silent.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from .errors import ConfigError, StoreMismatch

# Wrappers whose inner dataset keeps its own indexing (config key 'dataset').
INDEX_PRESERVING_WRAPPERS = ("CBGSDataset", "RepeatDataset", "ClassBalancedDataset", "ReplayViewsDataset")
# Train transforms that draw random numbers: their output differs from the cached (test-time) input.
RANDOM_TRANSFORMS = (
    "ObjectSample", "ObjectNoise", "GlobalRotScaleTrans", "RandomFlip3D", "PointShuffle",
    "RandomJitterPoints", "GlobalAlignment", "RandomDropPointsColor", "PointSample",
    "ObjectShuffle", "RandomResize3D", "AffineResize", "PhotoMetricDistortion3D",
)
SPLIT_LOADERS = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}


def unwrap_dataset_cfg(ds: Any) -> Any:
    """The innermost dataset config under index-preserving wrappers (the same object, not a copy)."""
    while ds.get("type") in INDEX_PRESERVING_WRAPPERS:
        ds = ds["dataset"]
    return ds


def base_dataset_cfg(cfg: Any, split: str = "train") -> dict:
    """The split's dataset config with index-preserving wrappers removed."""
    if split not in SPLIT_LOADERS:
        raise ConfigError(f"split must be one of {list(SPLIT_LOADERS)}. Got {split!r}.")
    loader = cfg.get(SPLIT_LOADERS[split])
    if not loader or "dataset" not in loader:
        raise ConfigError(f"the config has no {SPLIT_LOADERS[split]}.dataset; cannot build the {split} split.")
    ds = copy.deepcopy(unwrap_dataset_cfg(loader["dataset"]))
    if ds.get("type") == "ConcatDataset" or "datasets" in ds:
        raise ConfigError(
            "ConcatDataset is not supported: its rows have no single base index. Extract and "
            "train on each dataset separately, or merge the info files into one."
        )
    return ds


def test_pipeline(cfg: Any) -> list:
    """The deterministic test-time pipeline of a config."""
    if "test_pipeline" in cfg:
        return copy.deepcopy(cfg.test_pipeline)
    for key in ("test_dataloader", "val_dataloader"):
        if key in cfg and "pipeline" in cfg[key].get("dataset", {}):
            return copy.deepcopy(cfg[key]["dataset"]["pipeline"])
    raise ConfigError("the config has no test_pipeline (or test_dataloader.dataset.pipeline).")


def build_base_dataset(cfg: Any, split: str = "train", *, pipeline: list | None = None):
    """Build the split's base dataset (same ann_file, classes, filtering, hence same order)."""
    from mmdet3d.registry import DATASETS

    ds_cfg = base_dataset_cfg(cfg, split)
    if pipeline is not None:
        # A test pipeline packs no labels; the empty-GT check (which only drops samples at
        # __getitem__ time, never from the index list) must not reject every sample.
        ds_cfg["pipeline"] = pipeline
        ds_cfg["filter_empty_gt"] = False
    try:
        dataset = DATASETS.build(ds_cfg)
    except FileNotFoundError as exc:
        raise ConfigError(f"cannot build the {split} dataset: {exc}. Check data_root/ann_file.") from None
    except Exception as exc:  # mmengine fails serialising an empty info list with a bare ValueError
        why = ("it has no samples (empty data_list in the info file)" if "at least one array" in str(exc)
               else f"{type(exc).__name__}: {str(exc)[:300]}")
        raise ConfigError(f"cannot build the {split} dataset ({ds_cfg.get('ann_file')}): {why}. "
                          "Check data_root/ann_file.") from None
    if len(dataset) == 0:
        raise ConfigError(f"the {split} dataset ({ds_cfg.get('ann_file')}) is empty after filtering.")
    return dataset


def dataset_identity(dataset) -> tuple[list[str], list[int]]:
    """Ordered (token, sample_idx) of every sample, read from the infos without the pipeline."""
    tokens, indices = [], []
    for i in range(len(dataset)):
        info = dataset.get_data_info(i)
        tokens.append(str(info.get("token", info.get("sample_idx", i))))
        indices.append(int(info.get("sample_idx", i)))
    return tokens, indices


def ensure_index_meta(pipeline: list) -> None:
    """Make Pack3DDetInputs carry sample_idx and token: the store row and its identity check."""
    from mmdet3d.datasets.transforms import Pack3DDetInputs

    default = inspect.signature(Pack3DDetInputs.__init__).parameters["meta_keys"].default
    for step in pipeline:
        if str(step.get("type", "")).endswith("Pack3DDetInputs"):
            keys = tuple(step.get("meta_keys", default))
            step["meta_keys"] = keys + tuple(k for k in ("sample_idx", "token") if k not in keys)


def random_transforms(pipeline: Sequence[dict]) -> list[str]:
    """Names of the random transforms in a pipeline config (nested ones included)."""
    found = []
    for step in pipeline:
        name = step.get("type", "")
        name = name if isinstance(name, str) else getattr(name, "__name__", str(name))
        if name.split(".")[-1] in RANDOM_TRANSFORMS:
            found.append(name)
        for key in ("transforms", "pipeline"):
            if isinstance(step.get(key), (list, tuple)):
                found += random_transforms(step[key])
    return found


def strip_random_transforms(pipeline: Sequence[dict]) -> list[dict]:
    """A copy of the pipeline without its random transforms."""
    return [copy.deepcopy(s) for s in pipeline if str(s.get("type", "")).split(".")[-1] not in RANDOM_TRANSFORMS]


def batch_rows(data_samples: Sequence[Any], tokens: Sequence[str] | None, *, device: torch.device) -> torch.Tensor:
    """Store rows of a batch (= base dataset indices), each token checked against the store's
    (`tokens=None`, the online reference: no store, nothing to check)."""
    rows = []
    for sample in data_samples:
        meta = sample.metainfo
        if "sample_idx" not in meta:
            raise ConfigError(
                "data samples carry no 'sample_idx': keep 'sample_idx' and 'token' in "
                "Pack3DDetInputs.meta_keys of the student's train pipeline."
            )
        row = int(meta["sample_idx"])
        if tokens is None:
            rows.append(row)
            continue
        if not 0 <= row < len(tokens):
            raise StoreMismatch(f"sample index {row} is outside the store's {len(tokens)} rows.")
        token = meta.get("token")
        if token is not None and str(token) != tokens[row]:
            raise StoreMismatch(
                f"sample index {row} has token {token!r} but the store's row {row} was made from "
                f"{tokens[row]!r}: the dataset changed since extraction. Re-run `bevcache extract`."
            )
        rows.append(row)
    return torch.as_tensor(rows, dtype=torch.long, device=device)


def set_data_root(cfg: Any, data_root: str) -> None:
    """Point every dataset (through wrappers) and nuScenes evaluator of a config at another data root."""
    root = data_root.rstrip("/") + "/"
    for key in SPLIT_LOADERS.values():
        ds = cfg.get(key, {}).get("dataset") if cfg.get(key) else None
        while ds is not None:
            if "data_root" in ds:
                ds["data_root"] = root
            ds = ds.get("dataset")
    for key in ("val_evaluator", "test_evaluator"):
        ev = cfg.get(key)
        for item in ev if isinstance(ev, list) else [ev] if ev else []:
            if "data_root" in item:
                old = str(item["data_root"])
                item["data_root"] = root
                if str(item.get("ann_file", "")).startswith(old):
                    item["ann_file"] = root + str(item["ann_file"])[len(old):]
    cfg["data_root"] = root
