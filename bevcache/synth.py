"""Synthetic nuScenes-format LiDAR data that mmdet3d's NuScenesDataset and NuScenesMetric read unchanged.

A scene is a parked ego car whose 32-beam spinning LiDAR is ray-cast against a flat ground and
cuboid objects of the 10 nuScenes detection classes (class-typical sizes, constant velocities,
occlusion, range noise, dropout). `generate` writes the point clouds, mmdet3d v2 info pickles
(`nuscenes_infos_{train,val}.pkl`, same keys and types as real converted infos), a minimal
nuScenes table set per chosen version (`v1.0-mini`, `v1.0-trainval` or both) whose val split is
the devkit's val scenes of that version, so the unchanged metric scores predictions on it, and
the ground-truth database ObjectSample pastes from (`nuscenes_dbinfos_train.pkl`,
`nuscenes_gt_database/`), made by mmdet3d's own creator. Everything is a pure function of the
arguments and the seed; the version changes only the scene names in the tables.

Samples are spread over scenes of 2..10 samples (0.5 s apart). Scenes take the devkit's split
names in turn, so a split with more than 10 samples per name reuses names (harmless: the devkit
selects evaluation samples by name). With both versions the names are those in the same split of
both (mini_train's scene-0553 and scene-0796 are trainval val scenes, so they are not used). A
one-sample split has no velocities (the devkit needs a neighbouring annotation), which caps NDS
at 0.9: use num_val >= 2.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import pickle
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bevcache.errors import ConfigError

VERSION = "v1.0-mini"  # the info pkls' metainfo version when the mini tables are written
VERSIONS = ("v1.0-mini", "v1.0-trainval")
CLASSES = (
    "car",
    "truck",
    "trailer",
    "bus",
    "construction_vehicle",
    "bicycle",
    "motorcycle",
    "pedestrian",
    "traffic_cone",
    "barrier",
)
# nuscenes.utils.splits mini_train / mini_val: the devkit picks evaluation samples by scene name.
TRAIN_SCENE_NAMES = (
    "scene-0061",
    "scene-0553",
    "scene-0655",
    "scene-0757",
    "scene-0796",
    "scene-1077",
    "scene-1094",
    "scene-1100",
)
VAL_SCENE_NAMES = ("scene-0103", "scene-0916")
# mini_train names that v1.0-trainval also counts as train (its `train` list); both mini_val names are trainval val.
BOTH_TRAIN_SCENE_NAMES = tuple(n for n in TRAIN_SCENE_NAMES if n not in ("scene-0553", "scene-0796"))
GT_DATABASE = "nuscenes_gt_database"
GT_DBINFOS = "nuscenes_dbinfos_train.pkl"

SAMPLE_PERIOD_US = 500_000  # key frames at 2 Hz, as in nuScenes
SWEEP_PERIOD_US = 50_000  # non-key LiDAR sweeps at 20 Hz
MAX_SWEEPS = 9  # sweeps between two key frames
MAX_SCENE_SAMPLES = 10  # longer splits get more scenes: more layouts, and movers stay in the area

LIDAR_HEIGHT = 1.84  # LiDAR origin above the ground plane (m)
LIDAR2EGO_YAW = -math.pi / 2  # nuScenes LIDAR_TOP: x to the ego's right, y forward
LIDAR2EGO_TRANSLATION = (0.943, 0.0, LIDAR_HEIGHT)
GROUND_Z = -LIDAR_HEIGHT  # ground plane in the LiDAR frame
NUM_PTS_FEATS = 5  # x, y, z, intensity, ring index

BEAM_ELEVATIONS = np.deg2rad(np.linspace(-30.0, 10.0, 32))
AZIMUTH_STEPS = 1024
MAX_RANGE = 50.0
RANGE_NOISE = 0.02  # m, one sigma
DROPOUT = 0.05
AREA = 24.0  # objects stay inside |x|, |y| < AREA (LiDAR frame)
EGO_CLEARANCE = 3.0  # m kept free around the sensor (the ego car)
BOUNDARY_EPS = 1e-3  # points this close to a box face are dropped: counts never hinge on rounding
CLASS_RANGE_MARGIN = 1.5  # m inside the metric's class ranges (50/40/30 m from the ego)


@dataclass(frozen=True)
class _ClassSpec:
    category: str  # nuScenes category name (maps to the detection class in the devkit)
    index: int  # nuScenes category index
    size: tuple[float, float, float]  # mean l, w, h (m)
    vmax: float  # top speed when moving (m/s); 0: always static
    p_moving: float
    weight: float  # frequency among the extra objects of a scene
    intensity: float  # mean return intensity
    eval_range: float  # devkit class_range (detection_cvpr_2019)
    moving_attr: str | None  # the attribute mmdet3d's NuScenesMetric predicts from speed > 0.2 m/s
    static_attr: str | None


# fmt: off
_SPECS = (
    _ClassSpec('vehicle.car', 17, (4.6, 1.9, 1.7), 10.0, 0.5, 0.28, 40.0, 50, 'vehicle.moving', 'vehicle.parked'),
    _ClassSpec('vehicle.truck', 23, (6.9, 2.5, 2.9), 8.0, 0.4, 0.08, 35.0, 50, 'vehicle.moving', 'vehicle.parked'),
    _ClassSpec('vehicle.trailer', 22, (12.0, 2.9, 3.9), 6.0, 0.3, 0.03, 30.0, 50, 'vehicle.moving', 'vehicle.parked'),
    _ClassSpec('vehicle.bus.rigid', 16, (11.0, 2.9, 3.5), 8.0, 0.5, 0.03, 45.0, 50, 'vehicle.moving', 'vehicle.stopped'),
    _ClassSpec('vehicle.construction', 18, (6.4, 2.8, 3.2), 3.0, 0.3, 0.03, 50.0, 50, 'vehicle.moving', 'vehicle.parked'),
    _ClassSpec('vehicle.bicycle', 14, (1.8, 0.6, 1.3), 5.0, 0.5, 0.06, 25.0, 40, 'cycle.with_rider', 'cycle.without_rider'),
    _ClassSpec('vehicle.motorcycle', 21, (2.1, 0.8, 1.5), 9.0, 0.5, 0.05, 30.0, 40, 'cycle.with_rider', 'cycle.without_rider'),
    _ClassSpec('human.pedestrian.adult', 2, (0.7, 0.7, 1.8), 1.6, 0.6, 0.20, 15.0, 40, 'pedestrian.moving', 'pedestrian.standing'),
    _ClassSpec('movable_object.trafficcone', 12, (0.4, 0.4, 1.0), 0.0, 0.0, 0.12, 120.0, 30, None, None),
    _ClassSpec('movable_object.barrier', 9, (0.5, 2.5, 1.0), 0.0, 0.0, 0.12, 80.0, 30, None, None),
)
# fmt: on
_ATTRIBUTES = (
    "vehicle.moving",
    "vehicle.stopped",
    "vehicle.parked",
    "cycle.with_rider",
    "cycle.without_rider",
    "pedestrian.sitting_lying_down",
    "pedestrian.standing",
    "pedestrian.moving",
)


def generate(
    out_dir: str | Path,
    *,
    num_train: int,
    num_val: int,
    seed: int = 0,
    sweeps: int = 0,
    progress: bool = False,
    version: str | tuple[str, ...] = "both",
    gt_database: bool = True,
) -> dict:
    """Write a synthetic nuScenes-format dataset (points, v2 info pkls, tables of `version`:
    'v1.0-mini', 'v1.0-trainval' or 'both'; the ground-truth database) and return a summary."""
    versions = _versions(version)
    if num_train < 1 or num_val < 1:
        raise ConfigError(
            f"num_train and num_val must be >= 1. Got num_train={num_train}, num_val={num_val}."
        )
    if not 0 <= sweeps <= MAX_SWEEPS:
        raise ConfigError(
            f"sweeps must be in [0, {MAX_SWEEPS}] (20 Hz sweeps between 2 Hz key frames). Got {sweeps}."
        )
    out = Path(out_dir)
    taken = [
        p.name
        for p in (
            *(out / v for v in VERSIONS),
            out / GT_DATABASE,
            out / GT_DBINFOS,
            out / "samples",
            out / "sweeps",
            out / "maps",
            out / "nuscenes_infos_train.pkl",
            out / "nuscenes_infos_val.pkl",
        )
        if p.exists()
    ]
    if taken:
        raise ConfigError(
            f"{out} already holds a dataset ({', '.join(taken)}); choose an empty directory or delete it."
        )
    for sub in ("samples/LIDAR_TOP", "sweeps/LIDAR_TOP", "maps", *versions):
        (out / sub).mkdir(parents=True, exist_ok=True)

    tables = _static_tables()
    summary: dict = {"out_dir": str(out), "version": versions[0], "versions": list(versions), "seed": seed,
                     "sweeps": sweeps}
    n_points = 0
    train_names, val_names = _scene_names(versions)
    for split_id, (split, n, names, slots) in enumerate(
        (("train", num_train, train_names, len(TRAIN_SCENE_NAMES)), ("val", num_val, val_names, len(VAL_SCENE_NAMES)))
    ):
        infos: list[dict] = []
        sizes = _scene_sizes(n, slots)  # the mini split's name counts: the data never depends on the version
        for scene_idx, n_samples in enumerate(sizes):
            n_points += _write_scene(
                out,
                tables,
                infos,
                seed=seed,
                split=split,
                split_id=split_id,
                scene_idx=scene_idx,
                name=names[scene_idx % len(names)],
                n_samples=n_samples,
                sweeps=sweeps,
            )
            if progress:
                print(f"[synth] {split}: {len(infos)}/{n} samples", file=sys.stderr, flush=True)
        metainfo = {
            "categories": {c: i for i, c in enumerate(CLASSES)},
            "dataset": "nuscenes",
            "version": versions[0],
            "info_version": "1.1",
        }
        pkl = out / f"nuscenes_infos_{split}.pkl"
        with open(pkl, "wb") as f:
            pickle.dump({"metainfo": metainfo, "data_list": infos}, f, protocol=4)
        instances = [ins for info in infos for ins in info["instances"]]
        summary[f"{split}_pkl"] = str(pkl)
        summary[f"num_{split}"] = n
        summary[f"num_{split}_scenes"] = len(sizes)
        summary[f"num_{split}_boxes"] = sum(int(ins["num_lidar_pts"]) > 0 for ins in instances)
        summary[f"num_{split}_boxes_without_points"] = sum(
            int(ins["num_lidar_pts"]) == 0 for ins in instances
        )

    map_token = _token("map")
    tables["map"] = [
        {
            "token": map_token,
            "log_tokens": [log["token"] for log in tables["log"]],
            "category": "semantic_prior",
            "filename": f"maps/{map_token}.png",
        }
    ]
    (out / "maps" / f"{map_token}.png").write_bytes(_blank_png(8, 8))
    for name in sorted(tables):
        text = json.dumps(tables[name], indent=1)
        for v in versions:
            (out / v / f"{name}.json").write_text(text)
    summary["num_boxes"] = summary["num_train_boxes"] + summary["num_val_boxes"]
    summary["points_per_sample_mean"] = n_points / (num_train + num_val)
    if gt_database:
        summary["gt_database"] = write_gt_database(out, progress=progress)
    return summary


def _versions(version: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The table versions to write, in VERSIONS order, from 'both', one name or several."""
    wanted = set(VERSIONS) if version == "both" else {version} if isinstance(version, str) else set(version)
    if not wanted or not wanted <= set(VERSIONS):
        raise ConfigError(f"version must be one of {[*VERSIONS, 'both']}. Got {version!r}.")
    return tuple(v for v in VERSIONS if v in wanted)


def _scene_names(versions: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train, val) scene names that every chosen version's devkit split puts in that split."""
    if versions == ("v1.0-mini",):
        return TRAIN_SCENE_NAMES, VAL_SCENE_NAMES
    if versions == ("v1.0-trainval",):
        from nuscenes.utils import splits  # the official 700 train / 150 val names: no name repeats

        return tuple(splits.train), tuple(splits.val)
    return BOTH_TRAIN_SCENE_NAMES, VAL_SCENE_NAMES


def write_gt_database(out: str | Path, *, progress: bool = False) -> dict:
    """Write `nuscenes_dbinfos_train.pkl` and `nuscenes_gt_database/` for the train infos with
    mmdet3d's own creator (`tools/dataset_converters/create_gt_database.py` in the wheel), exactly as
    its create_data.py does for nuScenes: the points of the key frame and its sweeps (up to 10)
    inside each valid box, relative to the box centre, time lag in column 4."""
    import contextlib
    import importlib.util
    import io
    import time

    import mmdet3d

    from .runtime import setup_runtime

    setup_runtime()  # registries and the default scope the creator's dataset is built in
    package = Path(mmdet3d.__file__).parent
    where = [package / ".mim" / "tools", package.parent / "tools"]  # the wheel; a checkout on sys.path
    path = next((p for p in (w / "dataset_converters" / "create_gt_database.py" for w in where) if p.is_file()), None)
    if path is None:
        raise ConfigError(f"mmdet3d's ground-truth database creator is missing (looked in {[str(w) for w in where]}); "
                          "install mmdet3d from its wheel (make setup), or pass gt_database=False.")
    spec = importlib.util.spec_from_file_location("bevcache_mmdet3d_create_gt_database", path)
    creator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(creator)
    if not progress:  # its progress bar writes to the stdout bound at mmengine's import, and it prints counts
        creator.track_iter_progress = lambda tasks: tasks
    out = Path(out)
    start = time.perf_counter()
    with contextlib.nullcontext() if progress else contextlib.redirect_stdout(io.StringIO()):
        creator.create_groundtruth_database("NuScenesDataset", str(out), "nuscenes", "nuscenes_infos_train.pkl")
    with open(out / GT_DBINFOS, "rb") as f:
        infos = pickle.load(f)
    absent = [c for c in CLASSES if c not in infos]
    if absent:  # a tiny split may lack a class; mmdet3d's sampler then fails with a KeyError when built
        infos.update({c: [] for c in absent})
        with open(out / GT_DBINFOS, "wb") as f:
            pickle.dump(infos, f)
    return {"dbinfos": str(out / GT_DBINFOS), "objects": sum(len(v) for v in infos.values()),
            "classes": len(infos), "seconds": round(time.perf_counter() - start, 3)}


def _write_scene(
    out: Path,
    tables: dict,
    infos: list,
    *,
    seed: int,
    split: str,
    split_id: int,
    scene_idx: int,
    name: str,
    n_samples: int,
    sweeps: int,
) -> int:
    """Simulate one scene, write its point clouds, append its infos and table rows; return its key-frame point count."""
    rng = np.random.default_rng([seed, split_id, scene_idx])
    key = (seed, split, scene_idx)
    log_name = f"synth{seed}-{split}-{scene_idx:04d}"
    # Timestamps in microseconds, as in the tables; scenes start 100 s apart.
    t_base = 1_600_000_000_000_000 + (split_id * 10_000 + scene_idx) * 100_000_000
    t0, t1 = -sweeps * SWEEP_PERIOD_US / 1e6, (n_samples - 1) * SAMPLE_PERIOD_US / 1e6
    objects = _place_objects(rng, t0, t1)

    ego_yaw = float(rng.uniform(-math.pi, math.pi))
    ego_xy = rng.uniform(300.0, 1500.0, size=2)
    ego2global = _pose(ego_yaw, (float(ego_xy[0]), float(ego_xy[1]), 0.0))
    lidar2ego = _pose(LIDAR2EGO_YAW, LIDAR2EGO_TRANSLATION)
    lidar2global = ego2global @ lidar2ego

    log_tok, scene_tok, cs_tok = (
        _token("log", *key),
        _token("scene", *key),
        _token("calibrated_sensor", *key),
    )
    tables["log"].append(
        {
            "token": log_tok,
            "logfile": log_name,
            "vehicle": "bevcache-synth",
            "date_captured": "2020-09-13",
            "location": "bevcache-synthetic",
        }
    )
    tables["calibrated_sensor"].append(
        {
            "token": cs_tok,
            "sensor_token": _token("sensor", "LIDAR_TOP"),
            "translation": list(LIDAR2EGO_TRANSLATION),
            "rotation": _yaw_quaternion(LIDAR2EGO_YAW),
            "camera_intrinsic": [],
        }
    )
    sample_toks = [_token("sample", *key, k) for k in range(n_samples)]
    tables["scene"].append(
        {
            "token": scene_tok,
            "log_token": log_tok,
            "nbr_samples": n_samples,
            "first_sample_token": sample_toks[0],
            "last_sample_token": sample_toks[-1],
            "name": name,
            "description": f"bevcache synthetic scene (seed {seed}, {split})",
        }
    )

    ann_toks = [
        [_token("sample_annotation", *key, i, k) for k in range(n_samples)]
        for i in range(len(objects))
    ]
    for i, obj in enumerate(objects):
        tables["instance"].append(
            {
                "token": _token("instance", *key, i),
                "category_token": _token("category", _SPECS[obj.label].category),
                "nbr_annotations": n_samples,
                "first_annotation_token": ann_toks[i][0],
                "last_annotation_token": ann_toks[i][-1],
            }
        )

    scene_sd: list[dict] = []  # this scene's LiDAR sample_data rows, in time order
    n_points = 0
    for k in range(n_samples):
        t_us = t_base + k * SAMPLE_PERIOD_US
        boxes = _boxes_at(objects, k * SAMPLE_PERIOD_US / 1e6)
        points, counts = _scan(
            boxes, objects, np.random.default_rng([seed, split_id, scene_idx, k, 0])
        )
        n_points += len(points)
        fname = f"{log_name}__LIDAR_TOP__{t_us}.pcd.bin"
        points.tofile(out / "samples" / "LIDAR_TOP" / fname)

        sweep_infos = []
        for j in range(sweeps, 0, -1):  # oldest first in the sample_data chain
            ts_us = t_us - j * SWEEP_PERIOD_US
            sweep_pts, _ = _scan(
                _boxes_at(objects, (ts_us - t_base) / 1e6),
                objects,
                np.random.default_rng([seed, split_id, scene_idx, k, j]),
            )
            sname = f"{log_name}__LIDAR_TOP__{ts_us}.pcd.bin"
            sweep_pts.tofile(out / "sweeps" / "LIDAR_TOP" / sname)
            sd_tok = _token("sample_data", *key, k, j)
            scene_sd.append(
                _sample_data(
                    sd_tok, sample_toks[k], cs_tok, ts_us, f"sweeps/LIDAR_TOP/{sname}", False
                )
            )
            # The ego is parked, so a sweep's LiDAR frame is the key frame's: lidar2sensor is the identity.
            sweep_infos.insert(
                0,
                {
                    "timestamp": ts_us / 1e6,
                    "ego2global": ego2global.tolist(),
                    "lidar_points": {
                        "lidar_path": f"sweeps/LIDAR_TOP/{sname}",
                        "num_pts_feats": NUM_PTS_FEATS,
                        "lidar2ego": lidar2ego.tolist(),
                        "lidar2sensor": np.eye(4, dtype=np.float32).tolist(),
                    },
                    "sample_data_token": sd_tok,
                },
            )
        sd_tok = _token("sample_data", *key, k, 0)
        scene_sd.append(
            _sample_data(sd_tok, sample_toks[k], cs_tok, t_us, f"samples/LIDAR_TOP/{fname}", True)
        )
        tables["sample"].append(
            {
                "token": sample_toks[k],
                "timestamp": t_us,
                "scene_token": scene_tok,
                "prev": sample_toks[k - 1] if k > 0 else "",
                "next": sample_toks[k + 1] if k + 1 < n_samples else "",
            }
        )

        instances = []
        for i, obj in enumerate(objects):
            x, y, zc, length, width, height, yaw = (float(v) for v in boxes[i])
            spec = _SPECS[obj.label]
            moving = bool(np.hypot(*obj.vel) > 0.2)
            attr = spec.moving_attr if moving else spec.static_attr
            centre = lidar2global @ np.array([x, y, zc, 1.0])
            tables["sample_annotation"].append(
                {
                    "token": ann_toks[i][k],
                    "sample_token": sample_toks[k],
                    "instance_token": _token("instance", *key, i),
                    "visibility_token": "",
                    "attribute_tokens": [_token("attribute", attr)] if attr else [],
                    "translation": [float(c) for c in centre[:3]],
                    "size": [width, length, height],
                    "rotation": _yaw_quaternion(yaw + LIDAR2EGO_YAW + ego_yaw),
                    "prev": ann_toks[i][k - 1] if k > 0 else "",
                    "next": ann_toks[i][k + 1] if k + 1 < n_samples else "",
                    "num_lidar_pts": int(counts[i]),
                    "num_radar_pts": 0,
                }
            )
            # Layout of mmdet3d >= 1.0's nuscenes converter: gravity centre, (l, w, h), yaw in the LiDAR frame.
            instances.append(
                {
                    "bbox_label": obj.label,
                    "bbox_3d": [x, y, zc, length, width, height, yaw],
                    "bbox_3d_isvalid": bool(counts[i] > 0),
                    "bbox_label_3d": obj.label,
                    "num_lidar_pts": np.int64(counts[i]),
                    "num_radar_pts": np.int64(0),
                    "velocity": [float(obj.vel[0]), float(obj.vel[1])],
                }
            )
        infos.append(
            {
                "token": sample_toks[k],
                "timestamp": t_us / 1e6,
                "ego2global": ego2global.tolist(),
                "images": {},  # LiDAR only: no camera entries (a lidar-only NuScenesDataset never reads them)
                "lidar_points": {
                    "lidar_path": fname,
                    "lidar2ego": lidar2ego.tolist(),
                    "num_pts_feats": NUM_PTS_FEATS,
                },
                "lidar_sweeps": sweep_infos,
                "instances": instances,
                "sample_idx": len(infos),
            }
        )

    for a, b in itertools.pairwise(scene_sd):
        a["next"], b["prev"] = b["token"], a["token"]
    tables["sample_data"].extend(scene_sd)
    tables["ego_pose"].extend(
        {
            "token": sd["token"],
            "timestamp": sd["timestamp"],
            "rotation": _yaw_quaternion(ego_yaw),
            "translation": ego2global[:3, 3].tolist(),
        }
        for sd in scene_sd
    )
    return n_points


@dataclass(frozen=True)
class _Object:
    label: int
    lwh: tuple[float, float, float]
    p0: np.ndarray  # (2,) centre at the scene's first key frame, LiDAR frame
    vel: np.ndarray  # (2,) m/s, LiDAR frame
    yaw: float

    @property
    def radius(self) -> float:
        return 0.5 * math.hypot(self.lwh[0], self.lwh[1])


def _place_objects(rng: np.random.Generator, t0: float, t1: float) -> list[_Object]:
    """One object of every class, then random extras; no two footprints ever meet during [t0, t1]."""
    weights = np.array([s.weight for s in _SPECS])
    n_extra = int(rng.integers(14, 26))
    labels = list(range(len(CLASSES))) + [
        int(c) for c in rng.choice(len(CLASSES), size=n_extra, p=weights / weights.sum())
    ]
    lidar2ego = _pose(LIDAR2EGO_YAW, LIDAR2EGO_TRANSLATION)
    placed: list[_Object] = []
    for n, label in enumerate(labels):
        spec = _SPECS[label]
        lwh = tuple(
            float(v)
            for v in np.asarray(spec.size) * (1.0 + 0.06 * np.clip(rng.standard_normal(3), -2, 2))
        )
        radius = 0.5 * math.hypot(lwh[0], lwh[1])
        mandatory = n < len(CLASSES)
        want_moving = rng.random() < spec.p_moving
        attempts = 400 if mandatory else 60
        lim = AREA - radius
        for attempt in range(attempts):
            # Mandatory objects start near the sensor so every class is seen in every scene.
            p0 = rng.uniform(-1.0, 1.0, size=2) * (min(lim, 16.0) if mandatory else lim)
            if want_moving and attempt < attempts // 2:
                heading = float(rng.uniform(-math.pi, math.pi))
                speed = float(rng.uniform(max(0.5, 0.3 * spec.vmax), spec.vmax))
                vel, yaw = speed * np.array([math.cos(heading), math.sin(heading)]), heading
            else:
                vel, yaw = np.zeros(2), float(rng.uniform(-math.pi, math.pi))
            obj = _Object(label, lwh, p0, vel, yaw)
            if _fits(obj, placed, t0, t1, lidar2ego, spec.eval_range):
                placed.append(obj)
                break
    return placed


def _fits(
    obj: _Object,
    placed: list[_Object],
    t0: float,
    t1: float,
    lidar2ego: np.ndarray,
    eval_range: float,
) -> bool:
    """Whether a moving footprint stays in the area, off the ego, inside its metric range and clear of the others."""
    ends = np.stack([obj.p0 + obj.vel * t0, obj.p0 + obj.vel * t1])
    if np.abs(ends).max() > AREA - obj.radius:
        return False
    if _min_dist(obj.p0, obj.vel, t0, t1) < obj.radius + EGO_CLEARANCE:
        return False
    ego_ends = ends @ lidar2ego[:2, :2].T + lidar2ego[:2, 3]
    if np.linalg.norm(ego_ends, axis=1).max() > eval_range - CLASS_RANGE_MARGIN:
        return False
    return all(
        _min_dist(obj.p0 - o.p0, obj.vel - o.vel, t0, t1) > obj.radius + o.radius + 0.3
        for o in placed
    )


def _min_dist(d0: np.ndarray, dv: np.ndarray, t0: float, t1: float) -> float:
    """Smallest |d0 + dv t| over t in [t0, t1]."""
    vv = float(dv @ dv)
    t = 0.0 if vv == 0.0 else float(np.clip(-(d0 @ dv) / vv, t0, t1))
    return float(np.linalg.norm(d0 + dv * t))


def _boxes_at(objects: list[_Object], t: float) -> np.ndarray:
    """(K, 7) boxes (x, y, gravity-centre z, l, w, h, yaw) in the LiDAR frame at time t (s) after the first key frame."""
    boxes = np.zeros((len(objects), 7))
    for i, o in enumerate(objects):
        boxes[i, :2] = o.p0 + o.vel * t
        boxes[i, 2] = GROUND_Z + o.lwh[2] / 2
        boxes[i, 3:6] = o.lwh
        boxes[i, 6] = o.yaw
    return boxes


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


def _scan(
    boxes: np.ndarray, objects: list[_Object], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast one LiDAR revolution; return float32 (N, 5) points and the point count inside each box."""
    n_beams = len(BEAM_ELEVATIONS)
    az = (np.arange(AZIMUTH_STEPS) + rng.random()) * (
        2 * np.pi / AZIMUTH_STEPS
    )  # spin phase varies per scan
    # Rays in firing order (azimuth-major), unit directions of shape (A, beams).
    dx = np.cos(az)[:, None] * np.cos(BEAM_ELEVATIONS)[None, :]
    dy = np.sin(az)[:, None] * np.cos(BEAM_ELEVATIONS)[None, :]
    dz = np.broadcast_to(np.sin(BEAM_ELEVATIONS)[None, :], dx.shape)
    with np.errstate(divide="ignore"):
        t_hit = np.where(dz < 0, LIDAR_HEIGHT / -dz, np.inf)
    t_exit = np.full(dx.shape, np.inf)
    hit_id = np.full(dx.shape, -1)

    box_cols = []  # per box: the azimuth columns that can hit it or pass within BOUNDARY_EPS of it
    for k, (x, y, zc, length, width, height, yaw) in enumerate(boxes):
        c, s = math.cos(yaw), math.sin(yaw)
        sl, sw = np.array([1, 1, -1, -1]) * length / 2, np.array([1, -1, -1, 1]) * width / 2
        phi = math.atan2(y, x)
        rel = _wrap(np.arctan2(y + s * sl + c * sw, x + c * sl - s * sw) - phi)  # footprint corners
        rel_az = _wrap(az - phi)
        # Objects are >= EGO_CLEARANCE away, so 1 mrad covers anything within 1 mm of the footprint.
        cols = np.nonzero((rel_az >= rel.min() - 1e-3) & (rel_az <= rel.max() + 1e-3))[0]
        box_cols.append(cols)
        if cols.size == 0:
            continue
        # Slab test in the box frame: origin R^T(-centre), directions R^T d.
        origin = (-(c * x + s * y), -(-s * x + c * y), -zc)
        dirs = (c * dx[cols] + s * dy[cols], -s * dx[cols] + c * dy[cols], dz[cols])
        enter, leave = np.full(dirs[0].shape, -np.inf), np.full(dirs[0].shape, np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            for o, d, half in zip(origin, dirs, (length / 2, width / 2, height / 2), strict=True):
                ta, tb = (-half - o) / d, (half - o) / d
                enter, leave = (
                    np.maximum(enter, np.minimum(ta, tb)),
                    np.minimum(leave, np.maximum(ta, tb)),
                )
        hit = (leave > enter) & (enter > 0) & (enter < t_hit[cols])
        t_hit[cols] = np.where(hit, enter, t_hit[cols])
        t_exit[cols] = np.where(hit, leave, t_exit[cols])
        hit_id[cols] = np.where(hit, k, hit_id[cols])

    # Draw full-size arrays whatever was hit, so every scan consumes the generator identically.
    noise = rng.normal(0.0, RANGE_NOISE, dx.shape)
    kept = rng.random(dx.shape) >= DROPOUT
    jitter = rng.standard_normal(dx.shape)
    ground = hit_id < 0
    with np.errstate(invalid="ignore"):
        chord = t_exit - t_hit  # inf - inf (no return at all) gives NaN, masked out below
    # Object returns land just inside the surface, ground returns scatter both ways along the ray.
    rng_t = np.where(ground, t_hit + noise, t_hit + np.minimum(0.002 + np.abs(noise), 0.5 * chord))
    valid = kept & (t_hit <= MAX_RANGE) & (ground | (chord >= 0.02))
    box_intensity = np.array([_SPECS[o.label].intensity for o in objects] + [0.0])
    intensity = np.where(
        ground,
        12.0 * np.exp(-t_hit / 30.0) + 2.0 * jitter,
        box_intensity[hit_id] * (1.0 + 0.15 * jitter),
    )
    ring = np.broadcast_to(np.arange(n_beams, dtype=np.float64)[None, :], dx.shape)
    pts = np.stack(
        [dx * rng_t, dy * rng_t, dz * rng_t, np.clip(intensity, 0.0, 255.0), ring], axis=-1
    )[valid]
    pts = pts.astype(np.float32)
    point_col = np.nonzero(valid)[
        0
    ]  # azimuth column of each point (noise moves points along their ray)

    # Drop points within BOUNDARY_EPS of a box face, then count what lies inside each box.
    xyz = pts[:, :3].astype(np.float64)
    near = np.zeros(len(pts), dtype=bool)
    inside = []
    for k, cols in enumerate(box_cols):
        in_span = np.zeros(AZIMUTH_STEPS, dtype=bool)
        in_span[cols] = True
        cand = np.nonzero(in_span[point_col])[0]
        margin = _box_margin(xyz[cand], boxes[k : k + 1])[:, 0]
        near[cand[np.abs(margin) < BOUNDARY_EPS]] = True
        inside.append(cand[margin >= BOUNDARY_EPS])
    counts = np.array([np.count_nonzero(~near[idx]) for idx in inside], dtype=np.int64)
    return pts[~near], counts


def _box_margin(xyz: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N, K) distance from each point to the nearest face of each box, positive inside (Chebyshev-style)."""
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    rx, ry = xyz[:, :1] - boxes[:, 0], xyz[:, 1:2] - boxes[:, 1]
    lx, ly, lz = c * rx + s * ry, -s * rx + c * ry, xyz[:, 2:3] - boxes[:, 2]
    return np.minimum(
        np.minimum(boxes[:, 3] / 2 - np.abs(lx), boxes[:, 4] / 2 - np.abs(ly)),
        boxes[:, 5] / 2 - np.abs(lz),
    )


def _scene_sizes(n: int, n_names: int) -> list[int]:
    """Samples per scene: at least 2 per scene where possible (velocities), at most MAX_SCENE_SAMPLES."""
    n_scenes = max(min(n_names, max(1, n // 2)), math.ceil(n / MAX_SCENE_SAMPLES))
    return [n // n_scenes + (i < n % n_scenes) for i in range(n_scenes)]


def _sample_data(
    token: str, sample_token: str, cs_token: str, t_us: int, filename: str, key_frame: bool
) -> dict:
    return {
        "token": token,
        "sample_token": sample_token,
        "ego_pose_token": token,
        "calibrated_sensor_token": cs_token,
        "timestamp": t_us,
        "fileformat": "pcd",
        "is_key_frame": key_frame,
        "height": 0,
        "width": 0,
        "filename": filename,
        "prev": "",
        "next": "",
    }


def _static_tables() -> dict:
    """Tables that do not depend on the scenes; the per-scene ones start empty."""
    return {
        "category": [
            {
                "token": _token("category", s.category),
                "name": s.category,
                "description": f"synthetic {c}",
                "index": s.index,
            }
            for c, s in zip(CLASSES, _SPECS, strict=True)
        ],
        "attribute": [
            {"token": _token("attribute", a), "name": a, "description": a} for a in _ATTRIBUTES
        ],
        "visibility": [
            {
                "token": str(i + 1),
                "level": lvl,
                "description": f"visibility of whole object is {lvl}",
            }
            for i, lvl in enumerate(("v0-40", "v40-60", "v60-80", "v80-100"))
        ],
        "sensor": [
            {"token": _token("sensor", "LIDAR_TOP"), "channel": "LIDAR_TOP", "modality": "lidar"}
        ],
        **{
            name: []
            for name in (
                "calibrated_sensor",
                "ego_pose",
                "instance",
                "log",
                "sample",
                "sample_annotation",
                "sample_data",
                "scene",
            )
        },
    }


def _token(*parts: object) -> str:
    """32 hex characters, like a nuScenes token, derived from the parts."""
    return hashlib.md5(repr(parts).encode()).hexdigest()


def _pose(yaw: float, translation: tuple[float, float, float]) -> np.ndarray:
    m = np.eye(4)
    m[:2, :2] = [[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]]
    m[:3, 3] = translation
    return m


def _yaw_quaternion(yaw: float) -> list[float]:
    """[w, x, y, z] of a rotation by yaw about +z (the nuScenes table convention)."""
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


def _blank_png(width: int, height: int) -> bytes:
    """A valid all-zero 8-bit greyscale PNG (the devkit only checks that the map file exists)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    raw = b"".join(b"\x00" + bytes(width) for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
