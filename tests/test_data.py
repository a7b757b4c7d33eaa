"""bevcache.data: every data path follows --data-root, a missing file is named by its config key,
and every cached row's token is checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bevcache.data import batch_rows, build_base_dataset, check_data_files, set_data_root
from bevcache.errors import ConfigError, StoreMismatch

from .conftest import tiny_cfg

ZOO_CENTERPOINT = "centerpoint/centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d.py"


def zoo_config(name: str = ZOO_CENTERPOINT):
    """An mmdet3d zoo config from the installed wheel, unchanged."""
    import mmdet3d
    from mmengine.config import Config

    package = Path(mmdet3d.__file__).parent  # the wheel keeps configs in .mim; a checkout beside the package
    return Config.fromfile(str(next(p for p in (package / ".mim" / "configs" / name, package.parent / "configs" / name)
                                    if p.is_file())))


def _strings(node, key: str = ""):
    if hasattr(node, "items") and not isinstance(node, str):
        for k, v in node.items():
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _strings(v, f"{key}[{i}]")
    elif isinstance(node, str):
        yield key, node


def test_set_data_root_moves_every_data_path_of_a_zoo_config(tmp_path):
    cfg = zoo_config()
    assert any("data/nuscenes/" in v for _, v in _strings(cfg))
    set_data_root(cfg, str(tmp_path))
    root = f"{tmp_path}/"
    assert [(k, v) for k, v in _strings(cfg) if "data/nuscenes" in v] == []
    dataset = cfg.train_dataloader.dataset.dataset  # inside CBGSDataset
    assert dataset.data_root == root and cfg.val_dataloader.dataset.data_root == root
    for sampler in (dataset.pipeline[3].db_sampler, cfg.train_pipeline[3].db_sampler, cfg.db_sampler):
        assert sampler.data_root == root and sampler.info_path == root + "nuscenes_dbinfos_train.pkl"
    for evaluator in (cfg.val_evaluator, cfg.test_evaluator):
        assert evaluator.data_root == root and evaluator.ann_file == root + "nuscenes_infos_val.pkl"
    set_data_root(cfg, str(tmp_path / "again"))  # the new root is the old one next time
    assert cfg.db_sampler.info_path == f"{tmp_path}/again/nuscenes_dbinfos_train.pkl"


def test_a_missing_data_file_is_named_by_its_config_key(data_root, tmp_path):
    from .test_pipeline import augmented_with_object_sample

    cfg = tiny_cfg("tiny_teacher.py", data_root)
    steps = augmented_with_object_sample(cfg, data_root)
    missing = tmp_path / "nuscenes_dbinfos_train.pkl"
    steps[2]["db_sampler"]["info_path"] = str(missing)
    cfg.train_dataloader.dataset.pipeline = steps
    expected = rf"train_dataloader\.dataset\.pipeline\[2\]\.db_sampler\.info_path = {missing} does not exist"
    with pytest.raises(ConfigError, match=expected):
        build_base_dataset(cfg, "train")
    with pytest.raises(ConfigError, match=expected):
        check_data_files(cfg)
    build_base_dataset(cfg, "train", pipeline=cfg.test_pipeline)  # the test pipeline reads no database

    cfg = tiny_cfg("tiny_teacher.py", data_root)
    cfg.train_dataloader.dataset = dict(type="CBGSDataset", dataset=dict(cfg.train_dataloader.dataset,
                                                                         ann_file="nuscenes_infos_gone.pkl"))
    expected = rf"train_dataloader\.dataset\.dataset\.ann_file = {data_root}/nuscenes_infos_gone\.pkl does not exist"
    with pytest.raises(ConfigError, match=expected):
        build_base_dataset(cfg, "train")
    cfg = tiny_cfg("tiny_teacher.py", data_root)
    cfg.val_evaluator.ann_file = str(tmp_path / "val.pkl")
    with pytest.raises(ConfigError, match=r"val_evaluator\.ann_file = .*val\.pkl does not exist"):
        check_data_files(cfg)


def test_batch_rows_checks_every_token():
    from mmdet3d.structures import Det3DDataSample

    def sample(**meta):
        return Det3DDataSample(metainfo=meta)

    tokens, cpu = ["a", "b", "c"], torch.device("cpu")
    assert batch_rows([sample(sample_idx=2, token="c"), sample(sample_idx=0, token="a")], tokens, device=cpu).tolist() \
        == [2, 0]
    with pytest.raises(ConfigError, match=r"index 1 carries no 'token'.*keep 'sample_idx' and 'token' in "
                                          r"Pack3DDetInputs.meta_keys"):
        batch_rows([sample(sample_idx=0, token="a"), sample(sample_idx=1)], tokens, device=cpu)
    with pytest.raises(StoreMismatch, match="token 'x'"):
        batch_rows([sample(sample_idx=1, token="x")], tokens, device=cpu)
    with pytest.raises(ConfigError, match="no 'sample_idx'"):
        batch_rows([sample(token="a")], tokens, device=cpu)
    assert batch_rows([sample(sample_idx=1)], None, device=cpu).tolist() == [1]  # online reference: no store
