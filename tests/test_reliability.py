"""Faults and bad inputs: signals and kill -9 during training, disk full, unwritable paths, broken
teachers and datasets, damaged stores, a dying torchrun rank. Each ends in one actionable line."""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bevcache.cli import main
from bevcache.errors import StoreMismatch
from bevcache.extract import ExtractOptions, extract
from bevcache.store import open_store
from bevcache.train import TrainOptions, build_train_config

from .conftest import CONFIGS, REPO, bevcache_cmd

TEACHER = str(CONFIGS / "tiny_teacher.py")
STUDENT = str(CONFIGS / "tiny_student.py")

# The tiny student as a short iteration-based run: checkpoints every 2 iterations, no validation.
ITER_STUDENT = """
_base_ = ['{student}']
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=8, val_interval=10**9)
param_scheduler = []
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False, max_keep_ckpts=-1),
                     logger=dict(type='LoggerHook', interval=1))
log_processor = dict(type='LogProcessor', window_size=1, by_epoch=False)
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        sampler=dict(_delete_=True, type='InfiniteSampler', shuffle=True))
val_dataloader = None
val_cfg = None
val_evaluator = None
test_dataloader = None
test_cfg = None
test_evaluator = None
randomness = dict(seed=7, deterministic=False)
"""


def cli(*args: str):
    """The real click command in this process (monkeypatches apply); output holds stdout and stderr."""
    return CliRunner().invoke(main, [str(a) for a in args])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_one_line_error(result, *needles: str) -> str:
    output = result.output if hasattr(result, "output") else result.stdout + result.stderr
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = error_lines(output)
    assert len(lines) == 1, output[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    print(f"[{code}] {lines[0]}")  # shown with -s: the message a user sees
    return lines[0]


def _opts(data_root: Path, out: Path | str, **kw) -> ExtractOptions:
    base = dict(config=TEACHER, out=str(out), data_root=str(data_root), batch_size=2, num_workers=0,
                chunk_rows=4, dtype="float32", progress=False)
    base.update(kw)
    return ExtractOptions(**base)


def _extract_args(data_root, ckpt, out, *extra, chunk_rows: int = 4) -> list[str]:
    return ["extract", "--config", TEACHER, "--checkpoint", ckpt, "--data-root", str(data_root), "--out", str(out),
            "--batch-size", "2", "--num-workers", "0", "--chunk-rows", str(chunk_rows), "--dtype", "float32", *extra]


@pytest.fixture(scope="module")
def store(data_root, teacher_ckpt, tmp_path_factory) -> str:  # noqa: F811
    """A complete store of pts_neck (512) and pts_backbone (448): the reference for identity checks."""
    out = tmp_path_factory.mktemp("rel-store") / "features.zarr"
    extract(_opts(data_root, out, checkpoint=teacher_ckpt, layers=["pts_neck", "pts_backbone"]))
    return str(out)


@pytest.fixture(scope="module")
def neck_store(data_root, teacher_ckpt, tmp_path_factory) -> str:  # noqa: F811
    """What `_extract_args` makes uninterrupted (pts_neck only)."""
    out = tmp_path_factory.mktemp("rel-neck") / "features.zarr"
    extract(_opts(data_root, out, checkpoint=teacher_ckpt))
    return str(out)


@pytest.fixture(scope="module")
def iter_student(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cfg") / "iter_student.py"
    path.write_text(ITER_STUDENT.format(student=STUDENT))
    return str(path)


def assert_same_tables(a: str, b: str, layers=("pts_neck",)) -> None:
    sa, sb = open_store(a), open_store(b)
    assert sa.verify() == [] and sa.tokens == sb.tokens
    for layer in layers:
        assert torch.equal(sa.read_table(layer), sb.read_table(layer)), layer


def _train_args(iter_student, store, data_root, work, *extra) -> list[str]:
    return ["train", "--student", iter_student, "--cache", store, "--data-root", str(data_root),
            "--work-dir", str(work), *extra]


def _wait_for(condition, proc, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (rc {proc.returncode}) before the condition held:\n{err[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("timed out waiting for the training run")


def _checkpointed(work: Path) -> bool:
    last = work / "last_checkpoint"
    return last.is_file() and bool(last.read_text().strip())


# ---------------------------------------------------------------------------------------------
# 1. Signals during `bevcache train`


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_training_saves_a_checkpoint_and_resume_continues(sig, iter_student, store, data_root, tmp_path):
    work = tmp_path / "work"
    args = _train_args(iter_student, store, data_root, work)
    # Ctrl-C reaches the whole foreground process group, data loader workers included.
    workers = ["--cfg-options", "train_dataloader.num_workers=2"] if sig == signal.SIGINT else []
    proc = subprocess.Popen(bevcache_cmd(*args, "--cfg-options", "train_cfg.max_iters=200", *workers), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(lambda: _checkpointed(work), proc)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    line = assert_one_line_error(result, f"interrupted by {sig.name}", "--resume")
    it = int(re.search(r"at iteration (\d+)", line).group(1))
    ckpt = work / f"iter_{it}.pth"
    assert str(ckpt) in line and (work / "last_checkpoint").read_text().strip() == str(ckpt)
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["meta"]["iter"] == it

    resumed = subprocess.run(bevcache_cmd(*args, "--resume", "--cfg-options", f"train_cfg.max_iters={it + 2}"),
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert f"Auto resumed from the latest checkpoint {ckpt}" in log and f"resumed epoch: 0, iter: {it}" in log
    assert f"Iter(train) [{it + 1}/{it + 2}]" in log and f"Iter(train) [{it}/" not in log
    assert (work / "student_weights.pth").is_file()


def test_kill_9_during_training_resumes_with_intact_banks_and_ends_as_an_uninterrupted_run(
        iter_student, store, data_root, tmp_path):
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    from bevcache.guard import last_checkpoint

    def opts(work, **kw):
        return TrainOptions(student=iter_student, cache=store, data_root=str(data_root), work_dir=str(work),
                            cfg_options=["train_cfg.max_iters=6"], **kw)

    full = Runner.from_cfg(build_train_config(opts(tmp_path / "full")))
    full.train()
    expected = {k: v.clone() for k, v in full.model.state_dict().items()}

    work = tmp_path / "killed"
    proc = subprocess.Popen(bevcache_cmd(*_train_args(iter_student, store, data_root, work, "--cfg-options",
                                                      "train_cfg.max_iters=6")), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _checkpointed(work), proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckpt = last_checkpoint(work)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["meta"]["iter"] < 6

    class AfterLoad(Hook):  # what the model holds once mmengine has resumed, before any step
        def before_train(self, runner):
            self.state = {k: v.clone() for k, v in runner.model.state_dict().items() if k.startswith("crd.")}

    probe = AfterLoad()
    runner = Runner.from_cfg(build_train_config(opts(work, resume="auto")))
    runner.register_hook(probe)
    runner.train()
    bank_keys = [k for k in saved["state_dict"] if k.startswith("crd.")]
    assert {"crd.pts_neck.memory_s", "crd.pts_neck.memory_t", "crd.pts_neck.z_s"} <= set(bank_keys)
    for key in bank_keys:
        assert torch.equal(probe.state[key], saved["state_dict"][key]), key
    assert not torch.equal(saved["state_dict"]["crd.pts_neck.memory_s"], expected["crd.pts_neck.memory_s"])
    final = runner.model.state_dict()
    assert set(final) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_an_interrupt_mid_epoch_checkpoints_and_the_resumed_run_replays_that_epoch(store, data_root, tmp_path):
    """The CLI's default loop is epoch-based: the signal path in-process, on the real handler."""
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    from bevcache.errors import TrainingInterrupted
    from bevcache.guard import interruptible, run_guarded

    def epoch_cfg(**kw):
        cfg = build_train_config(TrainOptions(student=STUDENT, cache=store, data_root=str(data_root),
                                              work_dir=str(tmp_path), **kw))
        cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=1, val_interval=10)
        cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
        cfg.test_dataloader = cfg.test_cfg = cfg.test_evaluator = None
        cfg.train_dataloader.update(batch_size=4, num_workers=0, persistent_workers=False)  # 3 iterations
        cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=1)
        cfg.default_hooks.visualization = dict(type="Det3DVisualizationHook")
        return cfg

    class CtrlC(Hook):  # the user presses Ctrl-C during iteration 2 of 3
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if runner.iter == 1:
                os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with interruptible() as state, pytest.raises(TrainingInterrupted) as info:
        runner = Runner.from_cfg(epoch_cfg())
        runner.register_hook(CtrlC())
        run_guarded(runner, state)
    message = str(info.value)
    assert "interrupted by SIGINT at iteration 2" in message and "replays epoch 1" in message
    meta = torch.load(tmp_path / "iter_2.pth", map_location="cpu", weights_only=True)["meta"]
    assert (meta["epoch"], meta["iter"]) == (0, 2)
    assert signal.getsignal(signal.SIGINT) is before  # the handler in place before is restored

    resumed = Runner.from_cfg(epoch_cfg(resume="auto"))
    resumed.train()
    assert (resumed.epoch, resumed.iter) == (1, 2 + 3)
    assert (tmp_path / "epoch_1.pth").is_file()


def test_a_second_signal_stops_at_once_and_names_the_last_checkpoint(iter_student, store, data_root, tmp_path):
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    from bevcache.errors import TrainingInterrupted
    from bevcache.guard import interruptible, run_guarded

    class CtrlCTwice(Hook):  # an impatient user during iteration 3 (iter_2.pth exists)
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if runner.iter == 2:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)

    opts = TrainOptions(student=iter_student, cache=store, data_root=str(data_root), work_dir=str(tmp_path))
    with interruptible() as state, pytest.raises(TrainingInterrupted) as info:
        runner = Runner.from_cfg(build_train_config(opts))
        runner.register_hook(CtrlCTwice(), priority="HIGHEST")
        run_guarded(runner, state)
    assert "before a checkpoint could be saved" in str(info.value)
    assert f"the last checkpoint is {tmp_path / 'iter_2.pth'}" in str(info.value) and "--resume" in str(info.value)
    assert not (tmp_path / "iter_3.pth").exists()


class _SignalsItself(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C reaches the whole process group
        return i


def test_forked_children_under_the_interrupt_handlers(tmp_path):
    """Loader workers ignore Ctrl-C (the main process stops at a checkpoint; torch's own SIGTERM
    handler serves them); any other forked child stops as usual, so a pool's terminate() cannot
    hang in a process whose handlers are set."""
    import multiprocessing

    from bevcache.guard import interruptible

    with interruptible() as state:
        loader = torch.utils.data.DataLoader(_SignalsItself(), batch_size=1, num_workers=1,
                                             multiprocessing_context="fork")
        assert [int(b) for b in loader] == [0, 1]  # the worker survived its own SIGINT
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        child.start()
        time.sleep(0.5)
        child.terminate()
        child.join(20)
        assert child.exitcode == -signal.SIGTERM
        assert state.signum is None  # neither reached the main process's flag


def test_a_config_guard_hook_sets_a_flag_during_training_and_steps_aside_after_a_failed_run():
    from bevcache.guard import TrainGuardHook

    class FailingRunner:  # mmengine calls before_run, then a failure skips after_run
        def train(self):
            hook.before_run(self)
            os.kill(os.getpid(), signal.SIGINT)  # during training: only the flag
            assert hook.state.signum == signal.SIGINT
            raise RuntimeError("a check refused the data")

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # xdist workers ignore SIGINT
    try:
        hook = TrainGuardHook()
        with pytest.raises(RuntimeError, match="refused the data"):
            FailingRunner().train()
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # still set: no after_run
        with pytest.raises(KeyboardInterrupt):  # after the run: Ctrl-C interrupts at once again
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_ctrl_c_outside_a_training_loop_and_stray_os_errors_are_one_line(tmp_path, monkeypatch):
    def pressed(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr("bevcache.extract.load_config", pressed)
    result = cli("extract", "--config", TEACHER, "--out", tmp_path / "x.zarr")
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert len(error_lines(result.output)) == 1 and "interrupted" in result.output
    ckpt = tmp_path / "run.pth"
    torch.save({"state_dict": {"student.w": torch.zeros(1)}}, ckpt)
    assert_one_line_error(cli("export-student", ckpt, "/proc/bevcache-test/student.pth"), "/proc/bevcache-test")


def test_a_checkpoint_of_other_crd_widths_is_refused_on_resume(iter_student, store, data_root, tmp_path):
    work = tmp_path / "work"
    first = cli(*_train_args(iter_student, store, data_root, work, "--cfg-options", "train_cfg.max_iters=2"))
    assert first.exit_code == 0, first.output[-3000:]
    # Same work dir, but the teacher side now comes from pts_backbone (448 wide, not 512).
    other = cli(*_train_args(iter_student, store, data_root, work, "--resume", "--cfg-options",
                             "train_cfg.max_iters=4", "--distill", "layers={'pts_neck': 'pts_backbone'}"))
    assert_one_line_error(other, "crd.pts_neck.embed_t.weight", "(128, 512) in the checkpoint", "(128, 448) now")


# ---------------------------------------------------------------------------------------------
# 2. Disk full during extraction


def _disk_full_after(monkeypatch, *, feature_chunks_ok: int | None = None, writes_ok: int = 0) -> None:
    """LocalStore.set raises ENOSPC once `feature_chunks_ok` feature chunks were written (other keys
    pass), or, with feature_chunks_ok=None, after the first `writes_ok` writes of any key."""
    from zarr.storage import LocalStore

    real_set = LocalStore.set
    seen = {"features": 0, "any": 0}

    async def full_set(self, key, value, *args, **kwargs):
        if feature_chunks_ok is not None:
            if not (key.startswith("features/") and "/c/" in key) or seen["features"] < feature_chunks_ok:
                seen["features"] += key.startswith("features/") and "/c/" in key
                return await real_set(self, key, value, *args, **kwargs)
        elif seen["any"] < writes_ok:
            seen["any"] += 1
            return await real_set(self, key, value, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)

    monkeypatch.setattr(LocalStore, "set", full_set)


def test_disk_full_mid_extraction_keeps_finished_blocks_and_resume_completes(
        data_root, teacher_ckpt, neck_store, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "full.zarr"
    _disk_full_after(monkeypatch, feature_chunks_ok=1)  # block 0 lands, block 1's feature chunk does not
    result = cli(*_extract_args(data_root, teacher_ckpt, out))
    assert_one_line_error(result, str(out), "disk is full", "free space", "--resume")
    monkeypatch.undo()
    store = open_store(str(out))
    assert store.complete_mask().tolist() == [True] * 4 + [False] * 8
    problems = store.verify()
    assert len(problems) == 1 and "not written" in problems[0], problems  # nothing damaged
    np.testing.assert_array_equal(store.read_rows("pts_neck", np.arange(4)),
                                  open_store(neck_store).read_rows("pts_neck", np.arange(4)))
    resumed = cli(*_extract_args(data_root, teacher_ckpt, out, "--resume"))
    assert resumed.exit_code == 0, resumed.output[-3000:]
    assert_same_tables(str(out), neck_store)


def test_disk_full_while_creating_the_store_is_one_line_and_the_next_step_is_named(
        data_root, teacher_ckpt, neck_store, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "full.zarr"
    _disk_full_after(monkeypatch, writes_ok=1)  # the group's zarr.json lands, its arrays do not
    assert_one_line_error(cli(*_extract_args(data_root, teacher_ckpt, out)), "No space left on device", "free space",
                          "--resume")
    monkeypatch.undo()
    assert (out / "zarr.json").is_file()
    assert_one_line_error(cli(*_extract_args(data_root, teacher_ckpt, out, "--resume")), str(out),
                          "never finished being created", "--overwrite")
    assert cli(*_extract_args(data_root, teacher_ckpt, out, "--overwrite")).exit_code == 0
    assert_same_tables(str(out), neck_store)


# ---------------------------------------------------------------------------------------------
# 3. Unwritable output locations, refused before any heavy work


def _unwritable(where: str, tmp_path: Path) -> Path:
    if where == "under-a-file":
        plain = tmp_path / "plain.txt"
        plain.write_text("not a directory")
        return plain / "sub" / "features.zarr"
    if where == "proc":
        return Path("/proc/bevcache-test/features.zarr")
    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not stop root's writes (under-a-file and /proc cover it)")
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "features.zarr"


def _forbid(monkeypatch, *targets: str) -> None:
    def heavy(*_a, **_k):
        raise AssertionError("heavy work started before the output location was checked")

    for target in targets:
        monkeypatch.setattr(target, heavy)


@pytest.mark.parametrize("where", ["under-a-file", "proc", "chmod-555"])
def test_unwritable_out_is_refused_before_the_teacher_is_built(where, data_root, tmp_path, monkeypatch):
    out = _unwritable(where, tmp_path)
    _forbid(monkeypatch, "bevcache.extract.build_teacher", "bevcache.extract.build_base_dataset")
    result = cli("extract", "--config", TEACHER, "--data-root", data_root, "--out", out)
    assert_one_line_error(result, f"--out {out}", "choose a")


@pytest.mark.parametrize("where", ["under-a-file", "proc", "chmod-555"])
def test_unwritable_work_dir_is_refused_before_the_store_is_read(where, store, data_root, tmp_path, monkeypatch):
    work = _unwritable(where, tmp_path).parent
    _forbid(monkeypatch, "bevcache.train.build_base_dataset", "bevcache.store.open_store")
    result = cli("train", "--student", STUDENT, "--cache", store, "--data-root", data_root, "--work-dir", work)
    assert_one_line_error(result, f"--work-dir {work}", "choose a")


# ---------------------------------------------------------------------------------------------
# 4. Bad inputs


def test_config_without_a_model_is_refused(data_root, tmp_path):
    config = tmp_path / "no_model.py"
    config.write_text("train_dataloader = dict(batch_size=1)\n")
    for args in (["extract", "--config", config], ["train", "--student", config]):
        assert_one_line_error(cli(*args), "has no `model` section")


def test_missing_checkpoints_are_refused(data_root, store, iter_student, tmp_path):
    missing = tmp_path / "nope.pth"
    assert_one_line_error(cli("extract", "--config", TEACHER, "--data-root", data_root, "--out", tmp_path / "x.zarr",
                              "--checkpoint", missing), f"checkpoint not found: {missing}")
    assert not (tmp_path / "x.zarr").exists()
    assert_one_line_error(cli("train", "--student", STUDENT, "--data-root", data_root, "--work-dir", tmp_path / "w",
                              "--teacher-online", TEACHER, "--teacher-checkpoint", missing),
                          f"checkpoint not found: {missing}")
    assert_one_line_error(cli(*_train_args(iter_student, store, data_root, tmp_path / "w2", "--resume", missing)),
                          f"--resume {missing}: no such checkpoint")


def _variant_root(data_root: Path, tmp_path: Path, change) -> Path:
    """A data root (everything linked to data_root) whose train info list is changed by `change`."""
    root = tmp_path / "variant"
    root.mkdir()
    for entry in data_root.iterdir():
        (root / entry.name).symlink_to(entry)
    (root / "nuscenes_infos_train.pkl").unlink()
    original = pickle.loads((data_root / "nuscenes_infos_train.pkl").read_bytes())
    pkl = root / "nuscenes_infos_train.pkl"
    pkl.write_bytes(pickle.dumps({**original, "data_list": change(list(original["data_list"]))}))
    return root


def test_an_empty_dataset_is_refused(data_root, store, tmp_path):
    root = _variant_root(data_root, tmp_path, lambda items: [])
    assert_one_line_error(cli("extract", "--config", TEACHER, "--data-root", root, "--out", tmp_path / "x.zarr"),
                          "train dataset", "no samples")
    assert_one_line_error(cli("train", "--student", STUDENT, "--data-root", root, "--cache", store,
                              "--work-dir", tmp_path / "w"), "train dataset", "no samples")


def _added(items):
    extra = dict(items[-1], token="an-added-sample")
    return [*items, extra]


def _reordered(items):
    return [items[1], items[0], *items[2:]]


def _retokened(items):
    return [*items[:3], dict(items[3], token="another-token"), *items[4:]]


@pytest.mark.parametrize("change", [_added, lambda items: items[:-1], _reordered, _retokened],
                         ids=["sample-added", "sample-removed", "reordered", "other-token"])
def test_a_changed_dataset_is_refused_by_train_and_by_resume(change, data_root, store, teacher_ckpt, tmp_path):  # noqa: F811
    from mmengine.runner import Runner

    from .conftest import iteration_run

    root = _variant_root(data_root, tmp_path, change)
    with pytest.raises(StoreMismatch, match="not the dataset the store|training set has 1[13] samples"):
        Runner.from_cfg(iteration_run(build_train_config(TrainOptions(
            student=STUDENT, data_root=str(root), cache=store, work_dir=str(tmp_path / "w"))),
            work_dir=tmp_path / "w", iters=1)).train()
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    with pytest.raises(StoreMismatch, match="dataset (length|sha256)"):
        extract(_opts(root, copy, checkpoint=teacher_ckpt, layers=["pts_neck", "pts_backbone"], resume=True))


def test_a_nan_teacher_checkpoint_is_refused_before_a_store_exists(data_root, teacher_ckpt, tmp_path):  # noqa: F811
    state = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
    key = next(k for k in state["state_dict"] if k.startswith("pts_backbone") and k.endswith("weight"))
    state["state_dict"][key].view(-1)[0] = float("nan")
    bad = tmp_path / "nan.pth"
    torch.save(state, bad)
    out = tmp_path / "nan.zarr"
    assert_one_line_error(cli(*_extract_args(data_root, str(bad), out)), "NaN/Inf", "dataset index 0", str(bad))
    assert not out.exists()


def test_nan_from_one_sample_names_it_and_leaves_the_store_resumable(
        data_root, teacher_ckpt, neck_store, tmp_path, monkeypatch):  # noqa: F811
    import bevcache.extract as extract_module

    real = extract_module.pooled_teacher_features

    def poisoned(model, recorder, data, pooling, grids=None):
        pooled, maps = real(model, recorder, data, pooling, grids)
        out = {k: v.clone() for k, v in pooled.items()}
        for j, sample in enumerate(data["data_samples"]):
            if sample.metainfo.get("sample_idx") == 5:
                for value in out.values():
                    value[j] = float("nan")
        return out, maps

    monkeypatch.setattr(extract_module, "pooled_teacher_features", poisoned)
    out = tmp_path / "nan.zarr"
    assert_one_line_error(cli(*_extract_args(data_root, teacher_ckpt, out)), "NaN/Inf", "dataset index 5")
    monkeypatch.undo()
    store = open_store(str(out))
    assert store.complete_mask().tolist() == [True] * 4 + [False] * 8
    assert [p for p in store.verify() if "not written" not in p] == []
    assert cli(*_extract_args(data_root, teacher_ckpt, out, "--resume")).exit_code == 0
    assert_same_tables(str(out), neck_store)


def test_a_layer_that_never_runs_is_named(data_root, store, tmp_path):
    # CenterHead's loss modules exist but are not called when predicting.
    assert_one_line_error(cli("extract", "--config", TEACHER, "--data-root", data_root, "--out", tmp_path / "x.zarr",
                              "--layers", "pts_neck,pts_bbox_head.loss_cls", "--random-init"),
                          "pts_bbox_head.loss_cls", "produced no output")
    assert_one_line_error(cli("train", "--student", STUDENT, "--data-root", data_root, "--cache", store,
                              "--work-dir", tmp_path / "w", "--distill", "layers={'pts_bbox_head.loss_cls': 'pts_neck'}"),
                          "pts_bbox_head.loss_cls", "no floating tensor")  # a loss module: runs, but gives a scalar


def _damage(store: str, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / f"{how}.zarr"
    shutil.copytree(store, copy)
    if how == "deleted-feature-chunk":
        (copy / "features" / "pts_neck" / "c" / "1" / "0").unlink()
    elif how == "deleted-complete-chunk":
        (copy / "complete" / "c" / "2").unlink()
    else:
        chunk = copy / "features" / "pts_neck" / "c" / "1" / "0"
        raw = bytearray(chunk.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        chunk.write_bytes(bytes(raw))
    return copy


@pytest.mark.parametrize("how,message", [
    ("deleted-feature-chunk", "rows 4-7 are marked complete but hold no data"),
    ("flipped-byte", "checksum"),
    ("deleted-complete-chunk", "4 of 12 rows missing"),
])
def test_train_refuses_a_damaged_store(how, message, store, data_root, tmp_path):
    damaged = _damage(store, tmp_path, how)
    result = cli("train", "--student", STUDENT, "--data-root", data_root, "--cache", damaged,
                 "--work-dir", tmp_path / "w")
    assert_one_line_error(result, str(damaged), message)


# ---------------------------------------------------------------------------------------------
# 6. A rank that dies under torchrun


@pytest.mark.slow
def test_a_dying_rank_fails_torchrun_extraction_within_bounds_and_resume_completes(
        data_root, teacher_ckpt, neck_store, tmp_path):  # noqa: F811
    out = tmp_path / "ddp.zarr"
    # 6 blocks of 2 rows; rank 1 owns 3 and dies after its first, so rows stay missing whatever rank 0
    # manages before torchrun tears it down (with 3 blocks rank 1 died after its only one, and a
    # quick rank 0 completed the store: flaky under load).
    args = _extract_args(data_root, teacher_ckpt, out, chunk_rows=2)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(Path(__file__).with_name("fault_injection.py")), "--kill-after-blocks", "1", "--rank", "1", "--",
           *args, "--launcher", "pytorch"]
    start = time.time()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.time() - start
    assert result.returncode != 0, result.stderr[-3000:]
    assert re.search(r"rank\s*:?\s*1", result.stderr) and "SIGKILL" in result.stderr, result.stderr[-3000:]
    assert "--resume" in "".join(error_lines(result.stderr)), result.stderr[-3000:]  # rank 0, torn down
    assert elapsed < 120
    store = open_store(str(out))
    assert 0 < store.complete_mask().sum() < 12
    assert [p for p in store.verify() if "not written" not in p] == []
    resumed = cli(*_extract_args(data_root, teacher_ckpt, out, "--resume", chunk_rows=2))
    assert resumed.exit_code == 0, resumed.output[-3000:]
    assert_same_tables(str(out), neck_store)


def test_a_peer_dying_at_an_extraction_barrier_is_one_resumable_error(monkeypatch):
    """Rank 0 can reach a barrier before torchrun stops it; the dead peer's gloo error says --resume."""
    import mmengine.dist

    from bevcache.errors import StoreError
    from bevcache.extract import _barrier

    def closed(*_a):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:26524. GLHF!")

    monkeypatch.setattr(mmengine.dist, "barrier", closed)
    with pytest.raises(StoreError, match=r"another rank .*Connection closed by peer.*out\.zarr are durable.*--resume"):
        _barrier("out.zarr")
    with pytest.raises(StoreError, match=r"rank 0 creates the store\) says what to change"):  # before any block
        _barrier("out.zarr", blocks_written=False)


@pytest.mark.slow
def test_a_stalled_rank_makes_the_barrier_fail_after_the_dist_cfg_timeout(tmp_path):
    """The collective timeout is mmengine's own setting, env_cfg.dist_cfg.timeout (5 s here)."""
    script = Path(__file__).with_name("dist_timeout_script.py")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STALL_S": "60"}
    start = time.time()
    result = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()),
                             str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "rank 0 barrier failed" in result.stdout, result.stdout + result.stderr[-3000:]
    assert time.time() - start < 45  # not the stalled rank's 60 s, nor gloo's default 30 min
