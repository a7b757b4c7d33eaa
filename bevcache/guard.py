"""Interrupts (Ctrl-C / SIGTERM) for extract and train, and resuming against another store.

One mechanism serves both commands: `interruptible()` installs handlers whose first signal only
sets a flag in an `InterruptState`; extraction checks it between batches (finished blocks stay
durable), training checks it at the end of every iteration (`TrainGuardHook`).

Interrupts: the first SIGINT or SIGTERM only sets a flag. At the end of the iteration in progress
(all ranks agree on it under torchrun) `TrainGuardHook` saves a checkpoint, points the work dir's
`last_checkpoint` at it and stops with one line saying how to continue (`--resume`). A second
signal stops at once, naming the last checkpoint there is. An iteration-based loop resumes at the
next iteration; an epoch-based loop (mmengine restarts an epoch's data loader from its start)
replays the interrupted epoch's batches with the weights, banks and schedule reached.

Resume: mmengine loads a checkpoint whose tensors have other shapes non-strictly (a warning, then
training goes on with freshly initialised tensors). For the CRD part that means a checkpoint made
against a store of another feature width; `after_load_checkpoint` refuses it instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path

import torch
from mmdet3d.registry import HOOKS
from mmengine.hooks import Hook

from .errors import BevcacheError, StoreMismatch, TrainingInterrupted

log = logging.getLogger("bevcache")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class InterruptState:
    """What the signal handler saw: the first signal's number and how many arrived."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self.pid = os.getpid()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "?"

    def handle(self, signum: int, _frame: object) -> None:
        if os.getpid() != self.pid:
            if torch.utils.data.get_worker_info() is not None:
                return  # a data loader worker (Ctrl-C hits the process group): the main process ends it
            # Any other forked child (a multiprocessing pool: its terminate() sends SIGTERM and then
            # waits) stops as it would without bevcache, also when a failed run left the handler set.
            _act_as(signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL, signum, _frame)
            return
        self.count += 1
        if self.signum is None:
            self.signum = signum
        if self.count > 1:
            raise KeyboardInterrupt
        log.warning("%s received: finishing this iteration, then saving a checkpoint "
                    "(send it again to stop at once)", signal.Signals(signum).name)


def last_checkpoint(work_dir: str | Path) -> str | None:
    """The checkpoint `--resume` (no value) would load from work_dir, if any."""
    path = Path(work_dir) / "last_checkpoint"
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text if text and Path(text).is_file() else None


def _resume_hint(work_dir: str | Path) -> str:
    ckpt = last_checkpoint(work_dir)
    if ckpt:
        return f"the last checkpoint is {ckpt}: run the same command with --resume to continue from it."
    return "no checkpoint was saved yet: run the same command again (without --resume) to start over."


@HOOKS.register_module()
class TrainGuardHook(Hook):
    """Saves a checkpoint and stops after an interrupted iteration; refuses CRD checkpoints of other widths.

    Given no state (a config's custom_hooks), it installs the signal handlers itself for the run.
    """

    priority = "LOWEST"  # after CheckpointHook, so a checkpoint it just saved is not saved twice

    def __init__(self, state: InterruptState | None = None) -> None:
        self.state = state or InterruptState()
        self._own_handlers = state is None
        self._previous: dict = {}
        self._train_code = None

    def before_run(self, runner) -> None:
        if self._own_handlers and threading.current_thread() is threading.main_thread():
            self._train_code = type(runner).train.__code__
            self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}

    def after_run(self, runner) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        """The run's handler while `runner.train()` is on the stack. mmengine calls after_run only
        when training succeeds, so after a failed run (a notebook, a test session) the handlers
        are put back on the next signal, which then acts as it would have without this hook."""
        if os.getpid() != self.state.pid or _on_stack(frame, self._train_code):
            self.state.handle(signum, frame)
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.after_run(None)
        _act_as(previous, signum, frame)

    def _stop_requested(self) -> bool:
        import torch.distributed as dist

        flag = self.state.signum is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            tensor = torch.tensor([int(flag)])
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)  # gloo tensor on CPU; one int per iteration
            flag = bool(tensor.item())
        return flag

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not self._stop_requested():
            return
        from mmengine.dist import is_main_process

        filename = f"iter_{runner.iter + 1}.pth"
        path = Path(runner.work_dir) / filename
        saved = str(runner.message_hub.get_info("last_ckpt", "") or "")
        if not saved.endswith(filename):  # CheckpointHook did not save this very iteration
            runner.save_checkpoint(runner.work_dir, filename, by_epoch=False)
            if is_main_process():
                (Path(runner.work_dir) / "last_checkpoint").write_text(str(path))
        replay = ""
        if type(runner.train_loop).__name__ == "EpochBasedTrainLoop":
            replay = f" (epoch-based loop: the resumed run replays epoch {runner.epoch + 1}'s batches)"
        raise TrainingInterrupted(
            f"interrupted by {self.state.name} at iteration {runner.iter + 1}: checkpoint saved to {path}; "
            f"run the same command with --resume to continue from it{replay}."
        )

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        model = runner.model.module if hasattr(runner.model, "module") else runner.model
        if not hasattr(model, "crd"):
            return
        state = checkpoint.get("state_dict", checkpoint)
        wrong = []
        for name, crd in model.crd.items():  # a lazy embedding's width is only known from its checkpoint
            for side, dim in (("s", crd.student_dim), ("t", crd.teacher_dim)):
                weight = state.get(f"crd.{name}.embed_{side}.weight", state.get(f"module.crd.{name}.embed_{side}.weight"))
                if dim and weight is not None and tuple(weight.shape) != (crd.feat_dim, dim):
                    wrong.append(f"crd.{name}.embed_{side}.weight {tuple(weight.shape)} in the checkpoint, "
                                 f"{(crd.feat_dim, dim)} now")
        if wrong:
            raise StoreMismatch(
                f"the checkpoint does not fit this run's CRD widths ({'; '.join(wrong[:3])}): it was trained "
                "against a store (or distill settings) with other feature widths. Resume with the store and "
                "distill settings it was trained with, or start a new --work-dir."
            )


def _act_as(handler, signum: int, frame) -> None:
    """Do what `handler` (a Python handler, SIG_IGN or SIG_DFL) does with this signal."""
    if callable(handler):
        handler(signum, frame)
    elif handler != signal.SIG_IGN:  # SIG_DFL (or a handler not set from Python): the default action
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _on_stack(frame, code) -> bool:
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def interruptible():
    """SIGINT/SIGTERM set a flag (a second one raises KeyboardInterrupt); restored on exit."""
    state = InterruptState()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = {s: signal.signal(s, state.handle) for s in _SIGNALS}
    try:
        yield state
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_guarded(runner, state: InterruptState) -> None:
    """runner.train() with TrainGuardHook; any interrupt becomes one TrainingInterrupted line."""
    if state.signum is not None:
        raise TrainingInterrupted(f"interrupted by {state.name} before training started; "
                                  + _resume_hint(runner.work_dir))
    runner.register_hook(TrainGuardHook(state))
    try:
        runner.train()
    except BevcacheError:
        raise
    except BaseException as exc:
        if state.signum is None:
            raise
        # A second signal, or a data loader whose workers the signal (Ctrl-C hits the whole
        # process group) ended before the iteration finished.
        raise TrainingInterrupted(
            f"interrupted by {state.name} before a checkpoint could be saved ({type(exc).__name__}); "
            + _resume_hint(runner.work_dir)
        ) from None
