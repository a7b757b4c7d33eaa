"""Teacher weights: spconv checkpoints keep their layout, safe loading, frozen teacher, weight identity,
width probing, student export loadable without bevcache; and the tiny voxel (spconv) configs."""

from __future__ import annotations

import copy
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from mmengine.dataset import pseudo_collate
from mmengine.runner import Runner, save_checkpoint

from bevcache.data import build_base_dataset
from bevcache.errors import CheckpointError, ConfigError
from bevcache.features import LayerRecorder
from bevcache.runtime import setup_runtime
from bevcache.teacher import (
    SAFE_GLOBALS,
    build_model,
    build_teacher,
    config_record,
    export_student,
    load_checkpoint_file,
    probe_widths,
    register_safe_globals,
    student_state_dict,
    weights_sha256,
)

from .conftest import CONFIGS, iteration_run, tiny_cfg

VOXEL_TEACHER, VOXEL_STUDENT = "tiny_voxel_teacher.py", "tiny_voxel_student.py"
SPCONV_KEY = "pts_middle_encoder.conv_input.0.weight"


def _model(name: str, data_root: Path, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_cfg(name, data_root).model)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.fixture(scope="module")
def voxel_teacher_ckpt(data_root, tmp_path_factory) -> tuple[str, str]:
    """A voxel teacher saved the mmengine way (state dict with _metadata); (path, weights sha256)."""
    model = _model(VOXEL_TEACHER, data_root, seed=1)
    path = str(tmp_path_factory.mktemp("voxel-teacher") / "teacher.pth")
    save_checkpoint({"state_dict": model.state_dict(), "meta": {}}, path)
    return path, weights_sha256(model)


def _short_run(name: str, data_root: Path, work_dir: Path, iters: int):
    """`iters` Runner iterations at batch 2, a checkpoint every 2, with one LR scheduler (its state is pickled too)."""
    cfg = tiny_cfg(name, data_root)
    schedulers = cfg.param_scheduler[:1]
    cfg = iteration_run(cfg, work_dir=work_dir, iters=iters, checkpoint_interval=2)
    cfg.param_scheduler = schedulers
    return cfg


@pytest.fixture(scope="module")
def runner_ckpts(data_root, tmp_path_factory) -> dict[str, str]:
    """Real 2-iteration mmengine Runner checkpoints of the voxel and pillar students (with an LR scheduler)."""
    out = {}
    for name in (VOXEL_STUDENT, "tiny_student.py"):
        runner = Runner.from_cfg(_short_run(name, data_root, tmp_path_factory.mktemp("run"), iters=2))
        runner.train()
        out[name] = str(Path(runner.work_dir) / "iter_2.pth")
    return out


# --- the tiny voxel configs -------------------------------------------------------------------

@pytest.mark.parametrize("name, neck_channels", [(VOXEL_TEACHER, 512), (VOXEL_STUDENT, 256)])
def test_voxel_config_trains_and_predicts_on_cpu(data_root, name, neck_channels):
    cfg = tiny_cfg(name, data_root)
    model = _model(name, data_root)
    dataset = build_base_dataset(cfg, "train")
    batch = model.data_preprocessor(pseudo_collate([dataset[0], dataset[1]]), True)
    with LayerRecorder(model, ["pts_middle_encoder", "pts_neck"]) as rec:
        losses = model(**batch, mode="loss")
        neck = rec.outputs["pts_neck"]
        bev = rec.outputs["pts_middle_encoder"]
    assert bev.shape == (2, 128, 32, 32)  # 64 channels x 2 z-cells, 256 / 8 cells
    assert isinstance(neck, (list, tuple)) and neck[0].shape == (2, neck_channels, 32, 32)
    total = sum(v.sum() if isinstance(v, torch.Tensor) else sum(v) for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total)
    total.backward()  # through spconv on CPU: needs bevcache.compat's stream shim
    grad = model.pts_middle_encoder.conv_input[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        val = build_base_dataset(cfg, "val")
        results = model(**model.data_preprocessor(pseudo_collate([val[0]]), False), mode="predict")
    assert results[0].pred_instances_3d.bboxes_3d.tensor.shape[1] == 9


def test_voxel_student_is_smaller_than_the_teacher(data_root):
    sizes = {n: sum(p.numel() for p in _model(n, data_root).parameters()) for n in (VOXEL_TEACHER, VOXEL_STUDENT)}
    assert sizes[VOXEL_STUDENT] < 0.85 * sizes[VOXEL_TEACHER]  # same sparse encoder, half the BEV widths


# --- spconv checkpoints and the frozen teacher ------------------------------------------------

def test_spconv_checkpoint_round_trip_keeps_metadata(data_root, voxel_teacher_ckpt):
    path, sha = voxel_teacher_ckpt
    cfg = tiny_cfg(VOXEL_TEACHER, data_root)
    teacher = build_teacher(cfg, path, "cpu")
    assert weights_sha256(teacher) == sha
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # The spconv kernel layout ([out, kz, ky, kx, in]) is only known from _metadata's version 2.
    assert teacher.state_dict()[SPCONV_KEY].shape == (8, 3, 3, 3, 4)


def test_state_dict_without_metadata_is_refused(data_root, voxel_teacher_ckpt, tmp_path):
    """What a dict comprehension does to a valid spconv checkpoint: the loader must not accept it silently."""
    path, _ = voxel_teacher_ckpt
    state = load_checkpoint_file(path)["state_dict"]
    stripped = str(tmp_path / "stripped.pth")
    torch.save({"state_dict": {k: v for k, v in state.items()}}, stripped)
    with pytest.raises(CheckpointError) as exc:
        build_teacher(tiny_cfg(VOXEL_TEACHER, data_root), stripped, "cpu")
    text = _one_line(exc)
    assert f"size mismatch for {SPCONV_KEY}" in text and "pass the checkpoint trained with this config" in text


def test_ddp_prefixed_checkpoint_keeps_its_metadata(data_root, voxel_teacher_ckpt, tmp_path):
    path, sha = voxel_teacher_ckpt
    state = load_checkpoint_file(path)["state_dict"]
    prefixed = OrderedDict((f"module.{k}", v) for k, v in state.items())
    prefixed._metadata = OrderedDict((f"module.{k}" if k else "module", v) for k, v in state._metadata.items())
    ddp = str(tmp_path / "ddp.pth")
    save_checkpoint({"state_dict": prefixed}, ddp)
    assert weights_sha256(build_teacher(tiny_cfg(VOXEL_TEACHER, data_root), ddp, "cpu")) == sha


def test_checkpoint_of_another_model_names_the_keys(data_root, voxel_teacher_ckpt):
    with pytest.raises(CheckpointError) as exc:
        build_teacher(tiny_cfg(VOXEL_STUDENT, data_root), voxel_teacher_ckpt[0], "cpu")
    text = _one_line(exc)
    assert "size mismatch for pts_backbone." in text and "pass the checkpoint trained with this config" in text


def test_teacher_weights_come_from_checkpoint_or_load_from(data_root, voxel_teacher_ckpt, tmp_path):
    path, sha = voxel_teacher_ckpt
    cfg = tiny_cfg(VOXEL_TEACHER, data_root)
    assert cfg.get("load_from") is None
    with pytest.raises(ConfigError) as exc:
        build_teacher(cfg, None, "cpu")
    assert "--checkpoint" in _one_line(exc) and "--random-init" in str(exc.value)
    cfg.load_from = path
    assert weights_sha256(build_teacher(cfg, None, "cpu")) == sha
    cfg.load_from = str(tmp_path / "absent.pth")  # an explicit checkpoint wins over load_from
    assert weights_sha256(build_teacher(cfg, path, "cpu")) == sha
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        build_teacher(cfg, None, "cpu")


def test_random_teachers_differ_and_identity_survives_a_reload(data_root, tmp_path):
    cfg = tiny_cfg(VOXEL_TEACHER, data_root)
    torch.manual_seed(0)
    a = build_teacher(cfg, None, "cpu", random_init=True)
    b = build_teacher(cfg, None, "cpu", random_init=True)
    assert weights_sha256(a) != weights_sha256(b)
    path = str(tmp_path / "a.pth")
    save_checkpoint({"state_dict": a.state_dict()}, path)
    assert weights_sha256(build_teacher(cfg, path, "cpu")) == weights_sha256(a) == weights_sha256(a.state_dict())
    # every byte counts: one changed weight changes the digest
    state = a.state_dict()
    state[SPCONV_KEY] = state[SPCONV_KEY].clone()
    state[SPCONV_KEY].view(-1)[0] += 1e-3
    assert weights_sha256(state) != weights_sha256(a)


def test_probe_widths(data_root):
    cfg = tiny_cfg(VOXEL_TEACHER, data_root)
    model = _model(VOXEL_STUDENT, data_root).train()
    dataset = build_base_dataset(cfg, "train")
    widths = probe_widths(model, dataset, ["pts_neck", "pts_middle_encoder"], {"pts_neck": "avgmax",
                                                                                "pts_middle_encoder": "avg"})
    assert widths == {"pts_neck": 512, "pts_middle_encoder": 128}
    assert model.training  # the caller's mode is restored
    assert probe_widths(_model(VOXEL_TEACHER, data_root), dataset, ["pts_neck"], "avg") == {"pts_neck": 512}


# --- configs are never altered by building ------------------------------------------------------

def _register_popping_model():
    from mmdet3d.registry import MODELS

    class PoppingModel(torch.nn.Module):
        """Pops its voxelisation settings out of the config it gets, as BEVFusion's __init__ does."""

        def __init__(self, data_preprocessor: dict):
            super().__init__()
            self.voxelize_cfg = data_preprocessor.pop("voxelize_cfg")
            self.linear = torch.nn.Linear(2, 2)

    MODELS.register_module(name="BevcacheTestPoppingModel", module=PoppingModel, force=True)


def test_build_model_never_mutates_the_config(data_root):
    from mmdet3d.registry import MODELS
    from mmengine.config import ConfigDict

    setup_runtime()
    _register_popping_model()
    cfg = ConfigDict(model=dict(type="BevcacheTestPoppingModel",
                                data_preprocessor=dict(voxelize_cfg=dict(max_num_points=10))))
    record = config_record(cfg)
    before = copy.deepcopy(cfg.model.to_dict())
    build_model(cfg.model)
    build_model(cfg.model)  # a second build would miss the popped key
    assert cfg.model.to_dict() == before and config_record(cfg) == record
    MODELS.build(cfg.model)  # what a plain build does (so the test above can fail)
    assert "voxelize_cfg" not in cfg.model.data_preprocessor


def test_build_errors_are_one_line():
    with pytest.raises(ConfigError) as exc:
        build_model(dict(type="NoSuchDetector"))
    assert "NoSuchDetector" in _one_line(exc)


def test_config_record_is_json_and_stable(data_root):
    import json

    cfg = tiny_cfg(VOXEL_TEACHER, data_root)
    record = config_record(cfg)
    assert json.loads(json.dumps(record)) == record and len(record["sha256"]) == 64
    assert record["model"]["pts_neck"]["out_channels"] == [256, 256]
    build_teacher(cfg, None, "cpu", random_init=True)
    assert config_record(cfg) == record
    assert config_record(tiny_cfg(VOXEL_STUDENT, data_root))["sha256"] != record["sha256"]


# --- safe loading ------------------------------------------------------------------------------

def _refused_by_default(path: str) -> set[str]:
    """What torch's weights-only loader refuses in `path` with nothing registered (torch's own list)."""
    registered = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    finally:
        torch.serialization.add_safe_globals(registered)


def test_runner_checkpoint_loads_weights_only(runner_ckpts):
    names = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    for path in runner_ckpts.values():
        ckpt = load_checkpoint_file(path)
        assert {"state_dict", "message_hub", "optimizer", "param_schedulers", "meta"} <= set(ckpt)
        assert ckpt["message_hub"]["log_scalars"]["train/loss"].mean() > 0  # HistoryBuffer and its methods
        unsafe = _refused_by_default(path)
        assert unsafe and unsafe <= names, unsafe - names


def test_safe_globals_let_mmengine_resume(data_root, runner_ckpts, tmp_path, monkeypatch):
    """mmengine's resume calls a plain torch.load (weights_only by default on torch>=2.6)."""
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    path = runner_ckpts["tiny_student.py"]
    registered = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path)  # what mmengine's resume meets without the allow-list
        register_safe_globals()
        register_safe_globals()
        allowed = torch.serialization.get_safe_globals()
        assert len(allowed) == len(SAFE_GLOBALS) and all(g in allowed for g in SAFE_GLOBALS)  # idempotent
        load_checkpoint_file(path)  # its temporary allow-list must not undo the registration
        assert isinstance(torch.load(path), dict)
    finally:
        torch.serialization.add_safe_globals(registered)
    cfg = _short_run("tiny_student.py", data_root, tmp_path, iters=3)
    cfg.resume, cfg.load_from = True, path
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 3  # resumed at 2, trained one more


class _Evil:
    """A pickle that acts when loaded: creates `marker`."""

    def __init__(self, marker: Path, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "open":
            return open, (str(self.marker), "w")
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("how, name", [("open", "io.open"), ("system", "posix.system")])
def test_code_in_a_checkpoint_never_runs(data_root, tmp_path, how, name):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil.pth")
    torch.save({"state_dict": {}, "payload": _Evil(marker, how)}, path)
    for load in (lambda: load_checkpoint_file(path),
                 lambda: build_teacher(tiny_cfg(VOXEL_TEACHER, data_root), path, "cpu"),
                 lambda: export_student(path, str(tmp_path / "out.pth"))):
        with pytest.raises(CheckpointError) as exc:
            load()
        text = _one_line(exc)
        assert path in text and name in text and "pass --trust-checkpoint only if you trust its origin" in text
        assert not marker.exists()
    ckpt = load_checkpoint_file(path, trust=True)  # the user vouched for it: it does run
    assert marker.exists()
    if hasattr(ckpt["payload"], "close"):
        ckpt["payload"].close()


def test_unreadable_checkpoints_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint_file(tmp_path / "absent.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint_file(junk)
    assert str(junk) in _one_line(exc)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a dict"):
        load_checkpoint_file(tmp_path / "list.pth")


# --- the student's export ----------------------------------------------------------------------

def _as_distiller_checkpoint(runner_ckpt: str, out: Path) -> str:
    """A CRDDistiller-shaped checkpoint: the run's student under `student.` (keys and _metadata),
    CRD state under `crd.`, everything else of the real Runner checkpoint kept."""
    ckpt = load_checkpoint_file(runner_ckpt)
    student = ckpt["state_dict"]
    state = OrderedDict((f"student.{k}", v) for k, v in student.items())
    state.update({"crd.pts_neck.memory_t": torch.randn(12, 128), "crd.pts_neck.embed_s.weight": torch.randn(128, 256),
                  "crd.pts_neck.z": torch.tensor(1.0)})
    state._metadata = OrderedDict([("", {"version": 1}), *((f"student.{k}" if k else "student", v)
                                                            for k, v in student._metadata.items()),
                                   ("crd", {"version": 1}), ("crd.pts_neck", {"version": 1})])
    ckpt["state_dict"] = state
    path = str(out / "distiller.pth")
    save_checkpoint(ckpt, path)
    return path


def test_student_state_dict_strips_prefix_and_metadata():
    state = OrderedDict([("student.a.w", torch.ones(1)), ("crd.x", torch.ones(1))])
    state._metadata = OrderedDict([("", {"version": 1}), ("student", {"version": 7}),
                                   ("student.a", {"version": 2}), ("crd", {"version": 1})])
    out = student_state_dict(state)
    assert list(out) == ["a.w"] and out._metadata == OrderedDict([("", {"version": 7}), ("a", {"version": 2})])
    plain = student_state_dict(OrderedDict([("a.w", torch.ones(1)), ("crd.x", torch.ones(1))]))
    assert list(plain) == ["a.w"]


@pytest.mark.parametrize("name", [VOXEL_STUDENT, "tiny_student.py"])
@pytest.mark.parametrize("kind", ["distiller", "plain"])
def test_exported_student_loads_without_bevcache(data_root, runner_ckpts, tmp_path, name, kind):
    from mmdet3d.apis import init_model
    from mmengine.runner import load_checkpoint

    source = runner_ckpts[name]
    if kind == "distiller":
        source = _as_distiller_checkpoint(source, tmp_path)
    expected = weights_sha256(load_checkpoint_file(runner_ckpts[name])["state_dict"])
    out = export_student(source, str(tmp_path / "exported" / "student.pth"))
    exported = load_checkpoint_file(out)
    assert set(exported) == {"state_dict", "meta"} and not any(k.startswith("crd.") for k in exported["state_dict"])
    assert _refused_by_default(out) == set()  # any torch.load(weights_only=True) reads it, bevcache or not

    model = _model(name, data_root, seed=123)
    load_checkpoint(model, out, map_location="cpu", strict=True)
    assert weights_sha256(model) == expected

    config = tiny_cfg(name, data_root)
    detector = init_model(config, out, device="cpu")
    assert weights_sha256(detector) == expected
    assert list(detector.dataset_meta["classes"])[:2] == ["car", "truck"]


@pytest.mark.slow
def test_real_distiller_checkpoint_exports(data_root, voxel_teacher_ckpt, tmp_path):
    """One Runner iteration of the online CRDDistiller (voxel student and teacher): its checkpoint
    (student., teacher., crd. keys) loads weights-only and exports the student that trained."""
    from mmdet3d.apis import init_model

    from bevcache.train import TrainOptions, build_train_config

    cfg = build_train_config(TrainOptions(student=str(CONFIGS / VOXEL_STUDENT), teacher_online=str(CONFIGS / VOXEL_TEACHER),
                                          teacher_checkpoint=voxel_teacher_ckpt[0], data_root=str(data_root),
                                          work_dir=str(tmp_path)))
    runner = Runner.from_cfg(iteration_run(cfg, work_dir=tmp_path, iters=1, checkpoint_interval=1))
    runner.train()
    state = load_checkpoint_file(tmp_path / "iter_1.pth")["state_dict"]
    assert {k.split(".")[0] for k in state} >= {"student", "crd"}
    out = export_student(str(tmp_path / "iter_1.pth"), str(tmp_path / "student.pth"))
    trained = weights_sha256(runner.model.student)
    assert weights_sha256(init_model(tiny_cfg(VOXEL_STUDENT, data_root), out, device="cpu")) == trained


def test_export_refuses_what_holds_no_student(tmp_path):
    path = str(tmp_path / "crd_only.pth")
    save_checkpoint({"state_dict": OrderedDict([("crd.x", torch.ones(1))])}, path)
    with pytest.raises(CheckpointError, match="no student weights"):
        export_student(path, str(tmp_path / "out.pth"))
    assert not (tmp_path / "out.pth").exists()

