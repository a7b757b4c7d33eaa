"""Model weights in one place: safe checkpoint loading, the frozen teacher, weight identity,
layer-width probing and the plain student's export.

Checkpoints are read with torch's weights-only unpickler and an allow-list of exactly what
mmengine 0.10.7 checkpoints hold (its message hub pickles HistoryBuffers of numpy arrays), so a
crafted pickle never runs code unless the user says they trust the file. Weights are loaded with
mmengine's own loader, which keeps the state dict's `_metadata`: mmdet3d's spconv modules read the
version recorded there to decide their kernel layout, and without it a valid checkpoint is refused.

Imported by extract, train and the distiller; it imports none of them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from torch import nn

from .errors import CheckpointError, ConfigError
from .features import LayerRecorder

if TYPE_CHECKING:
    from mmengine.config import Config

# A whole mmengine Config (not a Mapping) or any mapping with a `model` key (e.g. ConfigDict(model=...)).
ConfigLike = Union["Config", Mapping[str, Any]]

log = logging.getLogger("bevcache")


def _history_buffer_attribute(owner: type, name: str) -> Any:
    """Stands in for `getattr` while unpickling: only HistoryBuffer's own methods come out."""
    # HistoryBuffer pickles its statistics methods ({'mean': HistoryBuffer.mean, ...}), and
    # torch.save's pickle protocol 2 writes a method as getattr(HistoryBuffer, 'mean'). A real
    # getattr would hand a checkpoint any attribute of any allowed object.
    value = vars(owner).get(name) if owner is HistoryBuffer and not name.startswith("_") else None
    if not callable(value):
        raise pickle.UnpicklingError(f"getattr({getattr(owner, '__qualname__', type(owner).__name__)}, {name!r}) "
                                     "is not an mmengine HistoryBuffer method")
    return getattr(owner, name)


# Everything besides tensors and torch's default allow-list (which has OrderedDict, _codecs.encode)
# that an mmengine 0.10.7 Runner checkpoint pickles, found by saving real Runner checkpoints
# (plain students, with LR schedulers) and listing what torch's weights-only loader refuses
# (torch.serialization.get_unsafe_globals_in_checkpoint): the message hub's HistoryBuffers (numpy
# float64/int64 arrays, their statistics methods) and numpy scalars in its runtime_info ('eta').
SAFE_GLOBALS: list[Any] = [
    HistoryBuffer,
    (_history_buffer_attribute, "builtins.getattr"),
    np.core.multiarray._reconstruct,  # type: ignore[attr-defined]
    np.core.multiarray.scalar,  # type: ignore[attr-defined]
    np.ndarray,
    np.dtype,
    np.dtypes.Float64DType,  # the weights-only loader BUILDs dtypes by their exact class
    np.dtypes.Int64DType,
]

_TRUST_HINT = "pass --trust-checkpoint only if you trust its origin"
_STUDENT = "student."


def _unregistered_safe_globals() -> list[Any]:
    present = set(torch.serialization.get_safe_globals())
    return [g for g in SAFE_GLOBALS if g not in present]


def register_safe_globals() -> None:
    """Allow SAFE_GLOBALS in every weights-only `torch.load` of this process (mmengine's resume); idempotent."""
    torch.serialization.add_safe_globals(_unregistered_safe_globals())


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_checkpoint_file(path: str | os.PathLike, *, trust: bool = False) -> dict:
    """Read a checkpoint onto the CPU, weights-only unless `trust`; CheckpointError otherwise."""
    path = str(path)
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint not found: {path}; pass the path of an existing .pth file.")
    try:
        if trust:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        else:
            # Only what is not registered yet: leaving the context removes its entries, which
            # would undo register_safe_globals() for the rest of the process.
            with torch.serialization.safe_globals(_unregistered_safe_globals()):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        lines = [line.strip() for line in text.split("WeightsUnpickler error:")[-1].splitlines() if line.strip()]
        refused = next((line for line in lines if re.search(r"GLOBAL|reduce|build|getattr", line, re.IGNORECASE)), None)
        if not trust and refused:
            found = re.search(r"GLOBAL (\S+)", refused)
            what = f"global {found.group(1)}" if found else _one_line(refused, 160)
            raise CheckpointError(f"checkpoint {path} holds an object the safe loader refuses ({what}); "
                                  f"{_TRUST_HINT}.") from None
        detail = refused or (lines[-2] if len(lines) > 1 and lines[-1].startswith("Check the documentation") else
                             lines[0] if lines else type(exc).__name__)
        raise CheckpointError(f"cannot read checkpoint {path}: {_one_line(detail, 200)}; check that it is a "
                              "complete torch/mmengine checkpoint.") from None
    except Exception as exc:  # truncated, not a torch file, unreadable, ...
        first = str(exc).strip().split(". ")[0]  # torch's zip-reader errors run on for lines
        raise CheckpointError(f"cannot read checkpoint {path}: {_one_line(f'{type(exc).__name__}: {first}', 200)}; "
                              "check that it is a complete torch/mmengine checkpoint.") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict of weights; "
                              "pass an mmengine/torch checkpoint (a state dict or a dict with 'state_dict').")
    return ckpt


def build_model(model_cfg: Mapping) -> nn.Module:
    """Build a model from a deep copy of its config (some models pop keys from the one they get)."""
    from mmdet3d.registry import MODELS

    from .runtime import setup_runtime

    setup_runtime()
    try:
        return MODELS.build(copy.deepcopy(model_cfg))
    except Exception as exc:
        kind = model_cfg.get("type", "?") if isinstance(model_cfg, Mapping) else "?"
        raise ConfigError(f"cannot build the model {kind!r} of the config: "
                          f"{_one_line(f'{type(exc).__name__}: {exc}')}; fix the config's model section.") from None


def resolve_teacher_checkpoint(cfg: ConfigLike, checkpoint: str | None) -> str | None:
    """The explicit checkpoint, else the config's `load_from` (as mmdet3d users expect), else None."""
    return checkpoint or cfg.get("load_from") or None


def _model_cfg(cfg: ConfigLike) -> Mapping:
    model = cfg.get("model") if hasattr(cfg, "get") else None  # a Config is no Mapping
    if model is None:
        raise ConfigError("the config has no `model` section; pass an mmdet3d detector config.")
    return model


def _mismatch_summary(text: str, limit: int = 3) -> str:
    """The first mismatching keys of mmengine's/torch's strict-load message, on one line."""
    parts = []
    for m in re.finditer(r"size mismatch for (\S+?): .*?shape .*?(torch\.Size\(\[[^\]]*\]\)).*?"
                         r"current model is (torch\.Size\(\[[^\]]*\]\))", text):
        parts.append(f"size mismatch for {m.group(1)}: checkpoint {m.group(2)[11:-1]} vs model {m.group(3)[11:-1]}")
    for label, pattern in (("unexpected keys", r"unexpected key in source state_dict: (.*)"),
                           ("missing keys", r"missing keys in source state_dict: (.*)")):
        found = re.search(pattern, text)
        if found:
            keys = [k for k in found.group(1).strip().split(", ") if k]
            more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
            parts.append(f"{label} {', '.join(keys[:limit])}{more}")
    return "; ".join(parts[: limit + 2]) or _one_line(text, 300)


def load_weights(model: nn.Module, path: str, *, trust: bool = False) -> dict:
    """Load a checkpoint file into `model` strictly, keeping `_metadata`; returns the checkpoint."""
    from mmengine.runner.checkpoint import _load_checkpoint_to_model

    ckpt = load_checkpoint_file(path, trust=trust)
    state = ckpt.get("state_dict", ckpt)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        # mmengine strips `module.` from the keys but not from `_metadata`: a DDP-saved spconv
        # checkpoint would then lose its layout version.
        state._metadata = OrderedDict((re.sub(r"^module\.", "", k), v) for k, v in metadata.items())
    try:
        _load_checkpoint_to_model(model, ckpt, strict=True, revise_keys=[(r"^module\.", "")])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the config's model ({_mismatch_summary(str(exc))}); "
                              "pass the checkpoint trained with this config.") from None
    return ckpt


def build_teacher(cfg: ConfigLike, checkpoint: str | None, device: torch.device | str, *,
                  trust_checkpoint: bool = False, random_init: bool = False) -> nn.Module:
    """The config's model with its weights (checkpoint, else load_from), frozen, in eval mode."""
    path = resolve_teacher_checkpoint(cfg, checkpoint)
    if path is None and not random_init:
        raise ConfigError("no teacher weights: pass --checkpoint (or set load_from in the config); "
                          "--random-init caches a randomly initialised teacher knowingly.")
    model = build_model(_model_cfg(cfg))
    if path is None:
        log.warning("teacher has random weights (--random-init): its features describe no trained model")
    else:
        load_weights(model, path, trust=trust_checkpoint)
    return model.to(device).eval().requires_grad_(False)


def weights_sha256(model_or_state_dict: nn.Module | Mapping[str, Any]) -> str:
    """sha256 over a state dict's entries in sorted key order (key, dtype, shape, bytes)."""
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        digest.update(key.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu").contiguous()
            digest.update(f"{t.dtype}|{tuple(t.shape)}\0".encode())
            # uint8 view: every dtype (bfloat16 too) hashes by its exact bytes
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:  # extra state (rare): its repr is the best stable identity available
            digest.update(f"{type(value).__name__}|{value!r}\0".encode())
    return digest.hexdigest()


def config_record(cfg: ConfigLike) -> dict:
    """The model section as a JSON-able dict and its sha256 (taken before any build can alter it)."""
    model = copy.deepcopy(_model_cfg(cfg))
    model = model.to_dict() if hasattr(model, "to_dict") else dict(model)
    # Same text as the stores' historical `model_hash`, so existing stores keep matching.
    text = json.dumps(model, sort_keys=True, default=str)
    return {"model": json.loads(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def probe_widths(model: nn.Module, dataset: Any, layers: Sequence[str],
                 pooling: str | Mapping[str, str]) -> dict[str, int]:
    """Pooled width of each layer from one eval-mode forward on dataset[0] (validates the names too)."""
    from mmengine.dataset import pseudo_collate

    was_training = model.training
    with LayerRecorder(model, layers, stop_early=True) as rec, torch.no_grad():
        model.eval()
        try:
            data = model.data_preprocessor(pseudo_collate([dataset[0]]), False)  # type: ignore[operator]
            rec.run(model, **data, mode="predict")
        finally:
            model.train(was_training)
        return {k: int(v.shape[1]) for k, v in rec.pooled(pooling, 1).items()}


def student_state_dict(state: Mapping[str, Any]) -> OrderedDict:
    """The plain student's state dict (with `_metadata`) from a distiller's or a plain checkpoint's."""
    metadata = getattr(state, "_metadata", None)
    if any(k.startswith(_STUDENT) for k in state):
        out = OrderedDict((k[len(_STUDENT):], v) for k, v in state.items() if k.startswith(_STUDENT))
        if metadata is not None:
            # "student" is the student's own root entry (""), "student.x" its submodule "x"
            out._metadata = OrderedDict(  # type: ignore[attr-defined]  # what load_state_dict reads
                ("" if k == "student" else k[len(_STUDENT):], v) for k, v in metadata.items()
                if k == "student" or k.startswith(_STUDENT))
        return out
    out = OrderedDict((k, v) for k, v in state.items() if not k.startswith("crd."))
    if metadata is not None:
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k, v) for k, v in metadata.items() if k != "crd" and not k.startswith("crd."))
    return out


def export_student(checkpoint: str, out: str, *, trust: bool = False) -> str:
    """Write the plain student's weights of a bevcache (or plain) checkpoint; loadable without bevcache."""
    from mmengine.runner import save_checkpoint

    from . import __version__

    ckpt = load_checkpoint_file(checkpoint, trust=trust)
    state = student_state_dict(ckpt.get("state_dict", ckpt))
    if not state:
        raise CheckpointError(f"checkpoint {checkpoint} holds no student weights; pass a checkpoint of "
                              "`bevcache train` (a work dir's epoch_N.pth / iter_N.pth).")
    source_meta: dict = ckpt["meta"] if isinstance(ckpt.get("meta"), dict) else {}
    meta = {"exported_from": str(checkpoint), "bevcache_version": __version__,
            # mmdet3d's init_model takes the class names from here
            **{k: source_meta[k] for k in ("dataset_meta", "epoch", "iter", "mmengine_version") if k in source_meta}}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    save_checkpoint({"state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, out)  # never a half-written file under the final name
    return out
