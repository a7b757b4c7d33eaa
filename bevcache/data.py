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
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .errors import ConfigError, StoreMismatch

log = logging.getLogger("bevcache")

# Wrappers whose inner dataset keeps its own indexing (config key 'dataset').
INDEX_PRESERVING_WRAPPERS = ("CBGSDataset", "RepeatDataset", "ClassBalancedDataset", "ReplayViewsDataset",
                             "TeacherRowsDataset")
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


def _base_dataset_key(cfg: Any, split: str) -> str:
    """The config key of the split's base dataset, e.g. 'train_dataloader.dataset.dataset' under CBGS."""
    key, ds = f"{SPLIT_LOADERS[split]}.dataset", cfg[SPLIT_LOADERS[split]]["dataset"]
    while ds.get("type") in INDEX_PRESERVING_WRAPPERS:
        key, ds = key + ".dataset", ds["dataset"]
    return key


def build_base_dataset(cfg: Any, split: str = "train", *, pipeline: list | None = None):
    """Build the split's base dataset (same ann_file, classes, filtering, hence same order)."""
    ds_cfg = base_dataset_cfg(cfg, split)
    key = _base_dataset_key(cfg, split)
    pipeline_key = None
    if pipeline is not None:
        # Built from a deep copy: building mutates step configs (ObjectSample gives its db_sampler a
        # 'type'), and callers record the pipeline they passed.
        if "test_pipeline" in cfg and pipeline == cfg["test_pipeline"] and pipeline != ds_cfg.get("pipeline"):
            pipeline_key = "test_pipeline"
        ds_cfg["pipeline"] = copy.deepcopy(list(pipeline))
        # A test pipeline packs no labels; the empty-GT check (which only drops samples at
        # __getitem__ time, never from the index list) must not reject every sample.
        ds_cfg["filter_empty_gt"] = False
    dataset = build_dataset_cfg(ds_cfg, f"the {split} dataset", key=key, pipeline_key=pipeline_key)
    if len(dataset) == 0:
        raise ConfigError(f"the {split} dataset ({ds_cfg.get('ann_file')}) is empty after filtering.")
    return dataset


# Datasets whose summary table mmdet3d already printed in this process (ann_file, test_mode); a
# launcher whose Runner prints it anyway marks its own builds as repeats (`summary_shown`).
_SUMMARY_SHOWN: set = set()


def _summary_key(ds_cfg: Any) -> tuple[str, bool]:
    base = unwrap_dataset_cfg(ds_cfg)
    return str(base.get("ann_file")), bool(base.get("test_mode"))


def summary_shown(ds_cfg: Any) -> None:
    """Count a dataset's summary as printed: later bevcache builds of it stay quiet."""
    _SUMMARY_SHOWN.add(_summary_key(ds_cfg))


def build_dataset_cfg(ds_cfg: Any, what: str, *, key: str = "dataset", pipeline_key: str | None = None):
    """DATASETS.build(ds_cfg); a missing data file is named by its config key (`key` is the dataset's).
    mmdet3d's summary table is printed for the first build of a dataset only."""
    from mmdet3d.registry import DATASETS

    from .quiet import dataset_summary_hidden

    summary_key = _summary_key(ds_cfg)
    with dataset_summary_hidden(summary_key in _SUMMARY_SHOWN):
        dataset = _build_dataset(DATASETS, ds_cfg, what, key=key, pipeline_key=pipeline_key)
    _SUMMARY_SHOWN.add(summary_key)
    return dataset


def _build_dataset(DATASETS, ds_cfg: Any, what: str, *, key: str, pipeline_key: str | None):  # noqa: N803
    paths = list(data_paths(ds_cfg, key, pipeline_key=pipeline_key))
    for name, path in paths:
        if _is_local(path) and not os.path.exists(path):
            raise ConfigError(f"cannot build {what}: {name} = {path} does not exist; point it at the file "
                              "(the config, or --data-root).")
    try:
        return DATASETS.build(ds_cfg)
    except FileNotFoundError as exc:
        missing = str(exc.filename or exc)
        named = [f"{name} = {path}" for name, path in paths if path == missing or os.path.basename(path) in missing]
        raise ConfigError(f"cannot build {what}: " + (f"{named[0]} does not exist" if named else
                          f"{exc}") + "; point it at the file (the config, or --data-root).") from None
    except Exception as exc:  # mmengine fails serialising an empty info list with a bare ValueError
        why = ("it has no samples (empty data_list in the info file)" if "at least one array" in str(exc)
               else f"{type(exc).__name__}: {str(exc)[:300]}")
        raise ConfigError(f"cannot build {what} ({ds_cfg.get('ann_file')}): {why}.") from None


def _is_local(path: str) -> bool:
    return bool(path) and "://" not in path


def _join(root: Any, path: str) -> str:
    """A data path as mmengine resolves it: relative paths are under the dataset's data_root."""
    return path if not root or os.path.isabs(path) or "://" in path else os.path.join(str(root), path)


def data_paths(ds_cfg: Any, key: str, *, pipeline_key: str | None = None,
               pipeline_files: bool = True) -> Iterator[tuple[str, str]]:
    """(config key, path) of every data file a dataset config reads: ann_file (through wrappers)
    and, with `pipeline_files`, every database info file (`info_path`, e.g. ObjectSample's
    db_sampler) in its pipeline."""
    if ds_cfg.get("ann_file"):
        yield f"{key}.ann_file", _join(ds_cfg.get("data_root"), str(ds_cfg["ann_file"]))
    if pipeline_files and isinstance(ds_cfg.get("pipeline"), (list, tuple)):
        yield from _info_paths(ds_cfg["pipeline"], pipeline_key or f"{key}.pipeline")
    if isinstance(ds_cfg.get("dataset"), dict):
        yield from data_paths(ds_cfg["dataset"], f"{key}.dataset", pipeline_files=pipeline_files)
    for i, sub in enumerate(ds_cfg.get("datasets") or []):
        yield from data_paths(sub, f"{key}.datasets[{i}]", pipeline_files=pipeline_files)


def _info_paths(node: Any, key: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        if isinstance(node.get("info_path"), str):
            yield f"{key}.info_path", node["info_path"]
        for k, v in node.items():
            yield from _info_paths(v, f"{key}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _info_paths(v, f"{key}[{i}]")


def check_data_files(cfg: Any, loaders: Sequence[str] = tuple(SPLIT_LOADERS.values()), *,
                     pipeline_files: bool = True) -> None:
    """Refuse (ConfigError) a config whose dataloaders or evaluators name a local data file that
    does not exist, naming the config key, e.g. `train_dataloader.dataset.pipeline[3].db_sampler.info_path`.
    `pipeline_files=False`: the loaders' pipelines will not run (e.g. extraction without views runs
    the test pipeline), so their database files are not needed."""
    found: list[tuple[str, str]] = []
    for name in loaders:
        if cfg.get(name) and isinstance(cfg[name].get("dataset"), dict):
            found += data_paths(cfg[name]["dataset"], f"{name}.dataset", pipeline_files=pipeline_files)
    for name in ("val_evaluator", "test_evaluator"):
        ev = cfg.get(name)
        for i, item in enumerate(ev if isinstance(ev, (list, tuple)) else [ev] if ev else []):
            if isinstance(item, dict) and isinstance(item.get("ann_file"), str):
                found.append((f"{name}{f'[{i}]' if isinstance(ev, (list, tuple)) else ''}.ann_file", item["ann_file"]))
    for name, path in found:
        if _is_local(path) and not os.path.exists(path):
            raise ConfigError(f"{name} = {path} does not exist; point it at the file (the config, or --data-root).")


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
    """Names of the known random transforms in a pipeline config (nested ones included): the fast,
    data-free view; `pipeline.random_steps` finds every random step by running the pipeline."""
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
    """A copy of the pipeline without its known random transforms (by name; `pipeline.strip_steps`
    removes exactly the steps `pipeline.random_steps` found)."""
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
        if "token" not in meta:
            raise ConfigError(
                f"the sample of dataset index {row} carries no 'token', so its store row cannot be checked: keep "
                "'sample_idx' and 'token' in Pack3DDetInputs.meta_keys of the student's train pipeline."
            )
        token = meta["token"]
        if str(token) != tokens[row]:
            raise StoreMismatch(
                f"sample index {row} has token {token!r} but the store's row {row} was made from "
                f"{tokens[row]!r}: the dataset changed since extraction. Re-run `bevcache extract`."
            )
        rows.append(row)
    return torch.as_tensor(rows, dtype=torch.long, device=device)


def set_data_root(cfg: Any, data_root: str) -> None:
    """Point every data path of a config at another data root: every dataset's data_root (through
    wrappers), every database sampler's data_root and info_path (ObjectSample's db_sampler, in every
    pipeline: the dataloaders' and pipeline variables such as train_pipeline), the evaluators'
    data_root and ann_file, and the top-level data_root. Paths are moved from the old root(s) to the
    new one; a path outside every old root is left as is (and named in a warning)."""
    root = data_root.rstrip("/") + "/"
    datasets = [ds for key in SPLIT_LOADERS.values() if cfg.get(key) for ds in _datasets(cfg[key].get("dataset"))]
    samplers = list(_with_info_path(cfg))
    evaluators = [item for key in ("val_evaluator", "test_evaluator")
                  for item in (cfg.get(key) if isinstance(cfg.get(key), (list, tuple)) else [cfg.get(key)])
                  if isinstance(item, dict)]
    roots = {str(node["data_root"]) for node in datasets + samplers + evaluators if node.get("data_root")}
    if cfg.get("data_root"):
        roots.add(str(cfg["data_root"]))
    old = sorted({o.rstrip("/") for o in roots if o.rstrip("/")}, key=len, reverse=True)

    def rebase(path: str, what: str) -> str:
        for o in old:
            if path == o or path.startswith(o + "/"):
                return root + path[len(o) + 1:]
        log.warning("%s = %s is outside the config's data root(s) %s; left unchanged by --data-root", what, path, old)
        return path

    for ds in datasets:
        if "data_root" in ds:
            ds["data_root"] = root
        if isinstance(ds.get("ann_file"), str) and os.path.isabs(ds["ann_file"]):  # relative: under data_root
            ds["ann_file"] = rebase(ds["ann_file"], "a dataset's ann_file")
    for sampler in samplers:
        if "data_root" in sampler:
            sampler["data_root"] = root
        sampler["info_path"] = rebase(str(sampler["info_path"]), "a database sampler's info_path")
    for item in evaluators:
        if "data_root" in item:
            item["data_root"] = root
        if isinstance(item.get("ann_file"), str):
            item["ann_file"] = rebase(item["ann_file"], "an evaluator's ann_file")
    cfg["data_root"] = root


def _datasets(ds: Any) -> Iterator[Any]:
    """A dataset config and every dataset config inside it (wrappers, ConcatDataset)."""
    if isinstance(ds, dict):
        yield ds
        yield from _datasets(ds.get("dataset"))
        for sub in ds.get("datasets") or []:
            yield from _datasets(sub)


def _with_info_path(node: Any) -> Iterator[Any]:
    """Every dict anywhere in a config with an 'info_path' (database samplers), each once."""
    seen: set[int] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if hasattr(n, "items") and not isinstance(n, (str, bytes)):  # dicts and mmengine's Config
            if isinstance(n, dict) and isinstance(n.get("info_path"), str) and id(n) not in seen:
                seen.add(id(n))
                yield n
            todo += [v for _, v in n.items()]
        elif isinstance(n, (list, tuple)):
            todo += list(n)


def base_dataset(dataset: Any) -> Any:
    """The built base dataset under index-preserving wrappers (the object `unwrap_dataset_cfg` describes)."""
    while type(dataset).__name__ in INDEX_PRESERVING_WRAPPERS:
        dataset = dataset.dataset
    return dataset


def find_wrapper(dataset: Any, kind: type) -> Any:
    """The dataset of class `kind` inside (or being) a possibly wrapped dataset, or None."""
    while dataset is not None:
        if isinstance(dataset, kind):
            return dataset
        dataset = getattr(dataset, "dataset", None)
    return None


def dataset_matches_store(store: Any, config: str, cfg_options: Sequence[str] = (), *,
                          data_root: str | None = None) -> str:
    """Check that `store` was extracted from the dataset `config` builds (same ordered tokens) and
    say what was compared; raises StoreMismatch naming the difference."""
    from .runtime import load_config, setup_runtime
    from .store import fingerprint_tokens

    setup_runtime()
    cfg = load_config(config, cfg_options)
    if data_root:
        set_data_root(cfg, data_root)
    split = store.attrs.get("split", "train")
    summary_shown(base_dataset_cfg(cfg, split))  # a check, not a data run: no dataset table
    dataset = build_base_dataset(cfg, split, pipeline=test_pipeline(cfg))
    fingerprint = fingerprint_tokens(dataset_identity(dataset)[0])
    store.check_matches(dataset=fingerprint)
    return (f"the {split} split of {config} matches it: {fingerprint['length']} samples in the same order, "
            f"token sha256 {fingerprint['sha256'][:12]}")
