"""What a train pipeline does to a sample: which steps are random, and whether they can be replayed.

A step is random when its output changes with the seed, whatever its name: each step of the
pipeline is built (mmdet3d's TRANSFORMS registry) and fed a real sample exactly as the dataset's
`prepare_data` would (its `get_data_info(i)` plus the box type), one step at a time; every step gets
the identical input (a deep copy) under several seeds of Python's `random`, numpy's global RNG and
torch's CPU RNG, and its outputs are compared (arrays, tensors, boxes/points, dicts, lists,
scalars). A step that gives a different output under any seed is random. A random step is
replayable when the same seed gives the same output again after other calls in between; a step
that draws from a generator nobody seeds, or keeps a running position across calls, is not.

Some transforms keep state that a seed alone does not fix (ObjectSample's database sampler walks
per-class shuffled lists across calls). `replay_reset` registers, per transform class, a function
that sets such state from the seed; `reset_replay_state` runs them inside the seeded block of every
view (`replay.augmented_sample`) and of every probe here, so a view depends only on its seed.

bevcache's list of known random transform names (`data.RANDOM_TRANSFORMS`) is kept as a
cross-check: a named step that never changed its output is still treated as random (its
randomness may be rare), and either disagreement is logged.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

log = logging.getLogger("bevcache")

PROBE_SEEDS = 16  # a 50% flip keeps one outcome under all 16 seeds with probability 2**-15 per sample
PROBE_SAMPLES = 2


@dataclass(frozen=True)
class RandomStep:
    """A random step of a pipeline config: `position` indexes the pipeline list, then the nested
    `transforms` lists of wrappers (e.g. (3,) or (2, 0)); `evidence` is 'observed' (its output
    changed with the seed) or 'name' (a known random transform that never changed it here)."""

    position: tuple[int, ...]
    type: str
    evidence: str = "observed"

    def where(self) -> str:
        return "pipeline" + "".join(f"[{p}]" if i == 0 else f".transforms[{p}]" for i, p in enumerate(self.position))


@dataclass(frozen=True)
class PipelineProbe:
    """What probing a pipeline found: its random steps, and those of them that are not replayable (with why)."""

    random: tuple[RandomStep, ...]
    unreplayable: tuple[tuple[RandomStep, str], ...]
    samples: tuple[int, ...]
    unreached: tuple[str, ...]  # steps no probed sample reached (an earlier step dropped it)


# ---------------------------------------------------------------------------------------------
# Seeds and replay state


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, numpy's global and torch's CPU RNG for the block; restore all three after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


_REPLAY_RESETS: dict[str, Callable[[Any, int], None]] = {}


def replay_reset(*type_names: str) -> Callable:
    """Register `fn(transform, seed)` that sets the cross-call state of transforms of these classes
    (or their subclasses) from the view seed, making them replayable."""

    def register(fn: Callable[[Any, int], None]) -> Callable[[Any, int], None]:
        for name in type_names:
            _REPLAY_RESETS[name] = fn
        return fn

    return register


def _sub_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()[:4], "big")


@replay_reset("ObjectSample")
def _reset_object_sample(transform: Any, seed: int) -> None:
    """ObjectSample's DataBaseSampler keeps, per class, a shuffled index list and a running position
    (mmdet3d's BatchSampler `_indices`, `_idx`): restart each from an order fixed by the seed."""
    samplers = getattr(getattr(transform, "db_sampler", None), "sampler_dict", None) or {}
    for name in sorted(samplers):
        sampler = samplers[name]
        indices = np.arange(len(sampler._indices))
        if getattr(sampler, "_shuffle", True):
            np.random.RandomState(_sub_seed(seed, name)).shuffle(indices)
        sampler._indices, sampler._idx, sampler._epoch_counter = indices, 0, 0


def _children(transform: Any) -> list | None:
    """The built nested transforms of a wrapper (MultiScaleFlipAug3D, mmcv Compose, ...), or None."""
    inner = getattr(transform, "transforms", None)
    inner = getattr(inner, "transforms", inner)  # a Compose holds its list in .transforms
    return inner if isinstance(inner, list) else None


def reset_replay_state(transforms: Any, seed: int) -> None:
    """Run the registered replay resets of every transform in `transforms` (a Compose, a list or
    one transform; nested wrappers included). Call inside `seeded_rngs(seed)`."""
    todo = [transforms]
    while todo:
        t = todo.pop()
        if isinstance(t, (list, tuple)):
            todo += list(t)
            continue
        if isinstance(t, _Recorder):
            t = t._inner
        for cls in type(t).__mro__:
            if cls.__name__ in _REPLAY_RESETS:
                _REPLAY_RESETS[cls.__name__](t, seed)
                break
        todo += _children(t) or []


# ---------------------------------------------------------------------------------------------
# Comparing outputs


def same_output(a: Any, b: Any, _depth: int = 0) -> bool:
    """Whether two step outputs are equal: arrays, tensors, mmdet3d boxes/points (by `.tensor` and
    their other fields), data samples, dicts, lists and scalars, recursively (NaN equals NaN)."""
    if _depth > 50:
        return a is b
    if a is None or b is None:
        return a is b
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(
            torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5))
                                  and torch.equal(a.isnan(), b.isnan())))
    if isinstance(a, np.ndarray):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype.kind in "fc":
            return bool(np.array_equal(a, b, equal_nan=True))
        if a.dtype.kind == "O":
            return all(same_output(x, y, _depth + 1) for x, y in zip(a.ravel(), b.ravel(), strict=True))
        return bool(np.array_equal(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_output(a[k], b[k], _depth + 1) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_output(x, y, _depth + 1) for x, y in zip(a, b, strict=True))
    if isinstance(a, (float, np.floating)):
        return bool(a == b or (a != a and b != b))
    if isinstance(a, (str, bytes, int, bool, np.generic, type)):
        return bool(a == b)
    if hasattr(a, "__dict__"):  # boxes, points (tensor + dims), Det3DDataSample, InstanceData, ...
        return same_output(vars(a), vars(b), _depth + 1)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  (an object without a usable ==: compare its text)
        return repr(a) == repr(b)


# ---------------------------------------------------------------------------------------------
# Probing


def _type_name(step: dict) -> str:
    name = step.get("type", "")
    name = name if isinstance(name, str) else getattr(name, "__name__", str(name))
    return name.split(".")[-1]


def _nested_cfgs(step: dict, built: Any) -> list | None:
    """The nested step configs of a wrapper when they line up one-to-one with its built children."""
    cfgs, children = step.get("transforms"), _children(built)
    if (isinstance(cfgs, (list, tuple)) and children is not None and len(cfgs) == len(children)
            and all(isinstance(c, dict) for c in cfgs)):
        return list(cfgs)
    return None


class _Recorder:
    """Stands in for a nested transform: records the first input its wrapper gives it."""

    def __init__(self, inner: Any) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "inputs", [])

    def __call__(self, results: Any) -> Any:
        if not self.inputs:
            self.inputs.append(copy.deepcopy(results))
        return self._inner(results)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:  # e.g. MultiScaleFlipAug3D sets .scale
        setattr(self._inner, name, value)


def _seeds(n: int) -> list[int]:
    return [int.from_bytes(hashlib.sha256(f"bevcache-probe:{k}".encode()).digest()[:4], "big") for k in range(n)]


def _run(transform: Any, results: Any, seed: int, where: str) -> Any:
    with seeded_rngs(seed):
        reset_replay_state(transform, seed)
        try:
            return transform(copy.deepcopy(results))
        except Exception as exc:
            raise ConfigError(f"probing the train pipeline: {where} failed on a real sample: "
                              f"{type(exc).__name__}: {str(exc)[:300]}") from exc


class _Prober:
    def __init__(self, seeds: list[int]) -> None:
        self.seeds = seeds
        self.changed: dict[tuple[int, ...], str] = {}  # position -> type, output changed with the seed
        self.unreplayable: dict[tuple[int, ...], str] = {}
        self.reached: set[tuple[int, ...]] = set()

    def step(self, pos: tuple[int, ...], name: str, cfg: dict, built: Any, x: Any, where: str) -> Any:
        """Probe one step on input x; return its output under the first seed (the next step's input)."""
        self.reached.add(pos)
        first = _run(built, x, self.seeds[0], where)
        random_here = any(not same_output(first, _run(built, x, s, where)) for s in self.seeds[1:])
        if random_here:
            again = _run(built, x, self.seeds[0], where)  # other seeds ran in between
            if not same_output(first, again):
                self.unreplayable.setdefault(pos, f"{name} ({where}) gave two different outputs for the same seed")
            nested = _nested_cfgs(cfg, built)
            if nested is not None and not self._nested(pos, cfg, built, nested, x, where):
                return first
            self.changed[pos] = name
        return first

    def _nested(self, pos, cfg, built, nested, x, where) -> bool:
        """Probe a random wrapper's children; False when random children alone explain it."""
        children = _children(built)
        assert children is not None  # _nested is called for wrappers only
        recorders = [_Recorder(c) for c in children]
        children[:] = recorders
        try:
            _run(built, x, self.seeds[0], where)
        finally:
            children[:] = [r._inner for r in recorders]
        found = False
        for j, (child_cfg, rec) in enumerate(zip(nested, recorders, strict=True)):
            if rec.inputs:
                self.step(pos + (j,), _type_name(child_cfg), child_cfg, rec._inner, rec.inputs[0],
                          f"{where}.transforms[{j}] {_type_name(child_cfg)}")
                found |= pos + (j,) in self.changed
        if not found:
            return True
        from mmdet3d.registry import TRANSFORMS

        stripped = copy.deepcopy(dict(cfg))
        stripped["transforms"] = [c for j, c in enumerate(nested) if pos + (j,) not in self.changed]
        rest = TRANSFORMS.build(stripped)
        first = _run(rest, x, self.seeds[0], where)
        if any(not same_output(first, _run(rest, x, s, where)) for s in self.seeds[1:]):
            for key in [k for k in self.changed if k[:len(pos)] == pos and len(k) > len(pos)]:
                del self.changed[key]  # the wrapper itself is random: strip it as a whole
            return True
        return False


def _base_dataset(dataset: Any) -> Any:
    """A built base dataset from a built (possibly wrapped) dataset or a dataset config."""
    from .data import base_dataset, build_dataset_cfg, unwrap_dataset_cfg

    if isinstance(dataset, dict):
        cfg = copy.deepcopy(unwrap_dataset_cfg(dataset))
        cfg["pipeline"] = []  # the probe builds the steps itself
        return build_dataset_cfg(cfg, "the probed dataset")
    return base_dataset(dataset)


def _pick(n: int, samples: int | Sequence[int]) -> list[int]:
    if isinstance(samples, int):
        k = max(1, min(int(samples), n))
        return sorted({(i * n) // k for i in range(k)})
    return [int(i) for i in samples]


_PROBES: dict[tuple, PipelineProbe] = {}


def probe_pipeline(pipeline: Sequence[dict], dataset: Any, *, samples: int | Sequence[int] = PROBE_SAMPLES,
                   seeds: int = PROBE_SEEDS) -> PipelineProbe:
    """Probe every step of `pipeline` on real samples of `dataset` (a built dataset or a dataset
    config, wrappers allowed) under `seeds` seeds; cached per (pipeline, dataset, samples) in-process."""
    from mmdet3d.registry import TRANSFORMS

    from .data import RANDOM_TRANSFORMS

    steps = copy.deepcopy([dict(s) for s in pipeline])
    base = _base_dataset(dataset)
    indices = _pick(len(base), samples)
    text = json.dumps(steps, sort_keys=True, default=str)
    key = (hashlib.sha256(text.encode()).hexdigest(), type(base).__name__, str(getattr(base, "ann_file", "")),
           str(getattr(base, "data_root", "")), len(base), tuple(indices), int(seeds))
    if key in _PROBES:
        return _PROBES[key]

    built = [TRANSFORMS.build(copy.deepcopy(s)) for s in steps]
    prober = _Prober(_seeds(int(seeds)))
    for index in indices:
        x = copy.deepcopy(base.get_data_info(index))
        if hasattr(base, "box_type_3d"):  # as Det3DDataset.prepare_data adds them
            x["box_type_3d"], x["box_mode_3d"] = base.box_type_3d, base.box_mode_3d
        for i, (cfg, t) in enumerate(zip(steps, built, strict=True)):
            x = prober.step((i,), _type_name(cfg), cfg, t, x, f"step {i} {_type_name(cfg)} on dataset index {index}")
            if x is None:  # the step dropped this sample (e.g. no boxes left): later steps see another
                break

    found = {pos: RandomStep(pos, name) for pos, name in prober.changed.items()}
    unreached = []
    for pos, name in _named_positions(steps):
        if any(pos[:len(p)] == p for p in found):  # found, or inside a wrapper stripped as a whole
            continue
        reached = pos in prober.reached  # nested steps are probed only inside a random wrapper
        if name in RANDOM_TRANSFORMS and len(pos) > 1:
            if reached:  # a wrapper may fix what its children would draw (MultiScaleFlipAug3D: the flips)
                log.info("%s %s never changed its output inside its wrapper; not random there",
                         RandomStep(pos, name).where(), name)
        elif name in RANDOM_TRANSFORMS:
            log.warning("%s %s is a known random transform but %s; treated as random", RandomStep(pos, name).where(),
                        name, f"never changed its output on dataset indices {indices} under {seeds} seeds"
                        if reached else "no probed sample reached it")
            found[pos] = RandomStep(pos, name, "name")
        elif not reached and len(pos) == 1:
            unreached.append(f"pipeline[{pos[0]}] {name}")
    for step in found.values():
        if step.evidence == "observed" and step.type not in RANDOM_TRANSFORMS:
            log.info("%s %s draws random numbers (found by probing; not a known random transform name)",
                     step.where(), step.type)
    if unreached:
        log.warning("random-transform probe: %s never ran (earlier steps dropped dataset indices %s); "
                    "not checked", ", ".join(unreached), indices)
    probe = PipelineProbe(
        random=tuple(sorted(found.values(), key=lambda s: s.position)),
        unreplayable=tuple((found[p], why) for p, why in sorted(prober.unreplayable.items()) if p in found),
        samples=tuple(indices),
        unreached=tuple(unreached),
    )
    _PROBES[key] = probe
    return probe


def _named_positions(steps: Sequence[dict], prefix: tuple[int, ...] = ()) -> Iterator[tuple[tuple[int, ...], str]]:
    for i, step in enumerate(steps):
        yield prefix + (i,), _type_name(step)
        nested = step.get("transforms")
        if isinstance(nested, (list, tuple)) and all(isinstance(c, dict) for c in nested):
            yield from _named_positions(nested, prefix + (i,))


def random_steps(pipeline: Sequence[dict], dataset: Any, *, samples: int | Sequence[int] = PROBE_SAMPLES,
                 seeds: int = PROBE_SEEDS) -> list[RandomStep]:
    """The random steps of a pipeline config, found by running it on real samples of `dataset`
    (see `probe_pipeline`); a known random transform at the top level that never changed its
    output is included too (evidence 'name'), since its randomness may just be rare."""
    return list(probe_pipeline(pipeline, dataset, samples=samples, seeds=seeds).random)


# Random steps that cannot simply go (they load the data) and have a deterministic setting instead:
# LoadPointsFromMultiSweeps draws which sweeps to load when a sample has more than sweeps_num
# (real nuScenes: ~10 sweeps per key frame, BEVFusion loads 9); test_mode=True takes the first ones.
DETERMINISTIC_SETTINGS = {"LoadPointsFromMultiSweeps": {"test_mode": True}}


def strip_steps(pipeline: Sequence[dict], steps: Sequence[RandomStep]) -> list[dict]:
    """A deep copy of the pipeline config without exactly these steps (nested ones included); a step
    with a deterministic setting (DETERMINISTIC_SETTINGS) is kept with that setting instead."""
    out = copy.deepcopy([dict(s) for s in pipeline])
    for step in sorted(steps, key=lambda s: s.position, reverse=True):
        holder: list = out
        for p in step.position[:-1]:
            holder = holder[p]["transforms"]
        last = step.position[-1]
        if last >= len(holder) or _type_name(holder[last]) != step.type:
            raise ConfigError(f"{step.where()} is not {step.type} in this pipeline: strip the steps of the pipeline "
                              "they were found in.")
        if step.type in DETERMINISTIC_SETTINGS:
            holder[last] = {**holder[last], **DETERMINISTIC_SETTINGS[step.type]}
        else:
            del holder[last]
    return out


def check_replayable(pipeline: Sequence[dict], dataset: Any, *, samples: int | Sequence[int] = PROBE_SAMPLES,
                     seeds: int = PROBE_SEEDS) -> list[RandomStep]:
    """Refuse (ConfigError) a pipeline with a random step whose output is not fixed by the seed;
    returns the random steps otherwise. Augmentation replay (--views) needs every view reproducible."""
    probe = probe_pipeline(pipeline, dataset, samples=samples, seeds=seeds)
    if probe.unreplayable:
        whys = "; ".join(why for _, why in probe.unreplayable)
        names = ", ".join(s.type for s, _ in probe.unreplayable)
        raise ConfigError(
            f"augmentation replay (--views) needs random transforms whose output depends only on the seed: {whys} "
            "(it draws from a random generator bevcache does not seed, or keeps state across calls). Remove "
            f"{names} from the train pipeline, or register a reset for it with bevcache.pipeline.replay_reset."
        )
    return list(probe.random)
