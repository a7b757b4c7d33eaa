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

With `cameras=True` it also renders the six nuScenes surround cameras (ray cast against the same
ground and boxes at each key frame, z-buffered, JPEG under `samples/CAM_*/`), fills each info's
`images` as mmdet3d 1.4's converter does and adds the camera sensor rows to the tables. Bicycles
and motorcycles then share one LiDAR geometry and differ only in paint (blue / red): a cue only
the camera sees (docs/synth_cameras.md). `cue_lidar_trace` gives the LiDAR a weak trace of it (a
small return-intensity difference between the two), the case where a camera teacher can help a
LiDAR student. Without cameras the output is bit-identical to the LiDAR-only generator's.
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
from dataclasses import dataclass, replace
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

# Cameras (generate(cameras=True)): the six nuScenes surround cameras, placed as on the nuScenes car
# (ego frame: x forward, y left; positions and headings rounded from the real calibration, level,
# no roll), focal lengths in pixels at nuScenes' 1600x900 and scaled with the image.
NUSCENES_IMAGE_SIZE = (1600, 900)
DEFAULT_IMAGE_SIZE = (384, 216)  # 0.24 x nuScenes: same 16:9 aspect and field of view, multiples of 8
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 32, 4096
JPEG_QUALITY = 92
CAMERA_CHANNELS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
# channel: (translation in the ego frame (m), heading of the optical axis (deg, ccw from ego x), focal (px at 1600 wide))
_CAMERA_MOUNTS = {
    "CAM_FRONT": ((1.70, 0.016, 1.51), 0.0, 1266.0),
    "CAM_FRONT_RIGHT": ((1.55, -0.493, 1.50), -55.0, 1260.0),
    "CAM_FRONT_LEFT": ((1.52, 0.495, 1.51), 55.0, 1272.0),
    "CAM_BACK": ((0.03, 0.003, 1.58), 180.0, 809.0),  # the wide (110 degree) rear camera
    "CAM_BACK_LEFT": ((1.04, 0.485, 1.59), 110.0, 1257.0),
    "CAM_BACK_RIGHT": ((1.02, -0.481, 1.56), -110.0, 1259.0),
}
NEAR_PLANE = 0.05  # m: box corners closer to (or behind) a camera's image plane do not bound its pixels

# The camera-only cue: with cameras these two classes share every LiDAR-visible property (size
# distribution, speeds, frequency, return intensity, metric range, attributes), so points cannot
# tell them apart; only their paint does (RGB, pure hues no other class uses). docs/synth_cameras.md.
CUE_CLASSES = ("bicycle", "motorcycle")
CUE_INTENSITY = 27.5
CUE_GEOMETRY = dict(size=(1.95, 0.7, 1.4), vmax=7.0, p_moving=0.5, weight=0.055, intensity=CUE_INTENSITY)
# `cue_lidar_trace` t splits the shared intensity: bicycles return (1 - t/2), motorcycles (1 + t/2) of it.
# Each return already scatters by 15% (one sigma), so a few percent is a trace only many points reveal.
MAX_CUE_LIDAR_TRACE = 0.5
# Base paint per class (RGB); non-cue classes are muted so the two cue hues stay unique to their class.
CLASS_COLOURS = {
    "car": (140, 142, 150),
    "truck": (196, 192, 180),
    "trailer": (122, 112, 102),
    "bus": (178, 170, 132),
    "construction_vehicle": (190, 160, 80),
    "bicycle": (30, 70, 230),  # cue: blue
    "motorcycle": (225, 35, 35),  # cue: red
    "pedestrian": (92, 82, 76),
    "traffic_cone": (240, 150, 30),  # amber: clear of the red cue hue
    "barrier": (212, 212, 206),
}
_SUN = np.array([0.35, 0.55, 0.76])  # light direction in the LiDAR frame (unit): faces shade differently
_SKY_TOP, _SKY_HORIZON = np.array([88.0, 128.0, 200.0]), np.array([170.0, 192.0, 220.0])
_ASPHALT = np.array([96.0, 96.0, 100.0])
_GROUND_TILE = 4.0  # m: a faint checker fixed in the global frame, so the ground moves with the ego pose
_PIXEL_NOISE = 2.0  # grey levels, one sigma


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
    cameras: bool = False,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    cue_lidar_trace: float = 0.0,
) -> dict:
    """Write a synthetic nuScenes-format dataset (points, v2 info pkls, tables of `version`:
    'v1.0-mini', 'v1.0-trainval' or 'both'; the ground-truth database) and return a summary.

    With `cameras`, also render the six nuScenes surround cameras at `image_size` (width, height)
    as JPEGs under `samples/CAM_*/`, fill each info's `images` and add the camera rows to the
    tables; bicycles and motorcycles then share one LiDAR geometry and differ only in colour
    (CUE_CLASSES, docs/synth_cameras.md). `cue_lidar_trace` (with cameras, in [0, 0.5]) makes
    motorcycles return that much more LiDAR intensity than bicycles, relative to the shared mean: a weak
    trace of the cue in the points; 0 keeps the classes LiDAR-identical. Without cameras the output is
    exactly that of a LiDAR-only run."""
    versions = _versions(version)
    _check_counts(num_train, num_val, sweeps)
    trace = _cue_lidar_trace(cue_lidar_trace, cameras)
    size = _image_size(image_size) if cameras else None
    out = Path(out_dir)
    _prepare_out_dir(out, versions, cameras)

    specs = _specs(cue=cameras, trace=trace)
    rig = _Rig.nuscenes(size) if size else None
    tables = _static_tables(cameras)
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
            scene = _simulate_scene(seed=seed, split=split, split_id=split_id, scene_idx=scene_idx,
                                    name=names[scene_idx % len(names)], n_samples=n_samples, sweeps=sweeps,
                                    specs=specs)
            n_points += _write_scene(out, tables, infos, scene, rig)
            if progress:
                print(f"[synth] {split}: {len(infos)}/{n} samples", file=sys.stderr, flush=True)
        summary.update(_write_infos(out, split, infos, versions[0], n, len(sizes), cameras, trace))

    _write_tables(out, tables, versions)
    summary["num_boxes"] = summary["num_train_boxes"] + summary["num_val_boxes"]
    summary["points_per_sample_mean"] = n_points / (num_train + num_val)
    if rig is not None:
        summary["cameras"] = {"channels": list(CAMERA_CHANNELS), "image_size": list(rig.image_size),
                              "cue": _cue_record(trace)}
    if gt_database:
        summary["gt_database"] = write_gt_database(out, progress=progress)
    return summary


def _check_counts(num_train: int, num_val: int, sweeps: int) -> None:
    if num_train < 1 or num_val < 1:
        raise ConfigError(
            f"num_train and num_val must be >= 1. Got num_train={num_train}, num_val={num_val}."
        )
    if not 0 <= sweeps <= MAX_SWEEPS:
        raise ConfigError(
            f"sweeps must be in [0, {MAX_SWEEPS}] (20 Hz sweeps between 2 Hz key frames). Got {sweeps}."
        )


def _cue_lidar_trace(trace: float, cameras: bool) -> float:
    """The cue's LiDAR trace as a float; it only means something where the cameras carry the cue."""
    try:
        value = float(trace)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 <= value <= MAX_CUE_LIDAR_TRACE:  # NaN fails too
        raise ConfigError(
            f"cue_lidar_trace must be a number in [0, {MAX_CUE_LIDAR_TRACE}] (the relative LiDAR intensity "
            f"difference between motorcycles and bicycles; 0: none). Got {trace!r}."
        )
    if value and not cameras:
        raise ConfigError(
            f"cue_lidar_trace={value} needs cameras=True (`bevcache synth --cameras`): without cameras the cue "
            "classes keep their own LiDAR geometry and there is no camera cue to trace."
        )
    return value


def _image_size(image_size: tuple[int, int] | list[int]) -> tuple[int, int]:
    """(width, height) as ints, within what the renderer and the JPEG encoder handle."""
    try:
        width, height = (int(v) for v in image_size)
        ok = (width, height) == tuple(image_size)
    except (TypeError, ValueError):
        ok = False
    if not ok or not (MIN_IMAGE_SIDE <= width <= MAX_IMAGE_SIDE and MIN_IMAGE_SIDE <= height <= MAX_IMAGE_SIDE):
        raise ConfigError(
            f"image_size must be two integers (width, height), each in [{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}]. "
            f"Got {image_size!r}. nuScenes' own size is {NUSCENES_IMAGE_SIZE}; the default {DEFAULT_IMAGE_SIZE} "
            "keeps its 16:9 aspect and field of view."
        )
    return width, height


def _prepare_out_dir(out: Path, versions: tuple[str, ...], cameras: bool) -> None:
    """Refuse a directory that already holds a dataset, then make the folders the writers fill."""
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
    cams = tuple(f"samples/{c}" for c in CAMERA_CHANNELS) if cameras else ()
    for sub in ("samples/LIDAR_TOP", "sweeps/LIDAR_TOP", *cams, "maps", *versions):
        (out / sub).mkdir(parents=True, exist_ok=True)


def _write_infos(out: Path, split: str, infos: list[dict], version: str, n: int, n_scenes: int,
                 cameras: bool, trace: float) -> dict:
    """Write one split's v2 info pkl; return its part of the summary."""
    metainfo = {
        "categories": {c: i for i, c in enumerate(CLASSES)},
        "dataset": "nuscenes",
        "version": version,
        "info_version": "1.1",
    }
    if cameras:  # mmengine keeps unknown metainfo keys: a reader can tell which classes the camera separates
        metainfo["synth_camera_cue"] = _cue_record(trace)
    pkl = out / f"nuscenes_infos_{split}.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"metainfo": metainfo, "data_list": infos}, f, protocol=4)
    instances = [ins for info in infos for ins in info["instances"]]
    return {
        f"{split}_pkl": str(pkl),
        f"num_{split}": n,
        f"num_{split}_scenes": n_scenes,
        f"num_{split}_boxes": sum(int(ins["num_lidar_pts"]) > 0 for ins in instances),
        f"num_{split}_boxes_without_points": sum(int(ins["num_lidar_pts"]) == 0 for ins in instances),
    }


def _write_tables(out: Path, tables: dict, versions: tuple[str, ...]) -> None:
    """Add the map (every log in it; the devkit only checks the file exists) and write each version's JSON tables."""
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
    assert spec is not None and spec.loader is not None  # a .py file that exists
    creator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(creator)
    if not progress:  # its progress bar writes to the stdout bound at mmengine's import, and it prints counts
        creator.track_iter_progress = lambda tasks: tasks  # type: ignore[attr-defined]
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


def _place_objects(
    rng: np.random.Generator, t0: float, t1: float, specs: tuple[_ClassSpec, ...] = _SPECS
) -> list[_Object]:
    """One object of every class, then random extras; no two footprints ever meet during [t0, t1]."""
    weights = np.array([s.weight for s in specs])
    n_extra = int(rng.integers(14, 26))
    labels = list(range(len(CLASSES))) + [
        int(c) for c in rng.choice(len(CLASSES), size=n_extra, p=weights / weights.sum())
    ]
    lidar2ego = _pose(LIDAR2EGO_YAW, LIDAR2EGO_TRANSLATION)
    placed: list[_Object] = []
    for n, label in enumerate(labels):
        spec = specs[label]
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
            obj = _Object(label, lwh, p0, vel, yaw)  # type: ignore[arg-type]  # lwh: three floats
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
    boxes: np.ndarray, objects: list[_Object], rng: np.random.Generator, specs: tuple[_ClassSpec, ...] = _SPECS
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
    box_intensity = np.array([specs[o.label].intensity for o in objects] + [0.0])
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


@dataclass
class _Scene:
    """One simulated scene: where it sits in the dataset, its objects and the (parked) ego pose."""

    seed: int
    split: str
    split_id: int
    scene_idx: int
    name: str
    n_samples: int
    sweeps: int
    specs: tuple[_ClassSpec, ...]
    objects: list[_Object]
    ego_yaw: float
    ego2global: np.ndarray
    lidar2ego: np.ndarray

    @property
    def key(self) -> tuple:
        return (self.seed, self.split, self.scene_idx)

    @property
    def log_name(self) -> str:
        return f"synth{self.seed}-{self.split}-{self.scene_idx:04d}"

    @property
    def t_base(self) -> int:
        """First key frame in microseconds, as in the tables; scenes start 100 s apart."""
        return 1_600_000_000_000_000 + (self.split_id * 10_000 + self.scene_idx) * 100_000_000

    @property
    def lidar2global(self) -> np.ndarray:
        return self.ego2global @ self.lidar2ego

    def t_us(self, k: int) -> int:
        return self.t_base + k * SAMPLE_PERIOD_US

    def sample_token(self, k: int) -> str:
        return _token("sample", *self.key, k)

    def ann_token(self, i: int, k: int) -> str:
        return _token("sample_annotation", *self.key, i, k)


def _simulate_scene(*, seed: int, split: str, split_id: int, scene_idx: int, name: str, n_samples: int,
                    sweeps: int, specs: tuple[_ClassSpec, ...]) -> _Scene:
    """Place the objects and the ego; the scene's generator is drawn in this order (the output depends on it)."""
    rng = np.random.default_rng([seed, split_id, scene_idx])
    t0, t1 = -sweeps * SWEEP_PERIOD_US / 1e6, (n_samples - 1) * SAMPLE_PERIOD_US / 1e6
    objects = _place_objects(rng, t0, t1, specs)
    ego_yaw = float(rng.uniform(-math.pi, math.pi))
    ego_xy = rng.uniform(300.0, 1500.0, size=2)
    return _Scene(seed=seed, split=split, split_id=split_id, scene_idx=scene_idx, name=name,
                  n_samples=n_samples, sweeps=sweeps, specs=specs, objects=objects, ego_yaw=ego_yaw,
                  ego2global=_pose(ego_yaw, (float(ego_xy[0]), float(ego_xy[1]), 0.0)),
                  lidar2ego=_pose(LIDAR2EGO_YAW, LIDAR2EGO_TRANSLATION))


def _write_scene(out: Path, tables: dict, infos: list, scene: _Scene, rig: _Rig | None) -> int:
    """Write one scene's point clouds (and images), append its infos and table rows; return its key-frame point count."""
    _add_scene_rows(tables, scene, rig)
    lidar_sd: list[dict] = []  # this scene's LiDAR sample_data rows, in time order
    camera_sd: dict[str, list[dict]] = {c: [] for c in CAMERA_CHANNELS} if rig else {}
    look = _SceneLook.of(scene, rig) if rig else None
    n_points = 0
    for k in range(scene.n_samples):
        boxes = _boxes_at(scene.objects, k * SAMPLE_PERIOD_US / 1e6)
        lidar = _write_lidar_frame(out, scene, k, boxes)
        n_points += lidar.num_points
        lidar_sd.extend(lidar.rows)
        tables["sample"].append(_sample_row(scene, k))
        instances = _annotate(tables, scene, k, boxes, lidar.in_boxes)
        # Without cameras `images` stays empty, as before (a LiDAR-only NuScenesDataset never reads it).
        images = _write_camera_frame(out, scene, k, boxes, rig, look, camera_sd) if rig and look else {}
        infos.append(
            {
                "token": scene.sample_token(k),
                "timestamp": scene.t_us(k) / 1e6,
                "ego2global": scene.ego2global.tolist(),
                "images": images,
                "lidar_points": lidar.lidar_points,
                "lidar_sweeps": lidar.sweep_infos,
                "instances": instances,
                "sample_idx": len(infos),
            }
        )
    _add_sensor_chains(tables, scene, [lidar_sd, *camera_sd.values()])
    return n_points


def _add_scene_rows(tables: dict, scene: _Scene, rig: _Rig | None) -> None:
    """The scene's log, calibrated sensors, scene and instance rows."""
    key = scene.key
    log_tok = _token("log", *key)
    tables["log"].append(
        {
            "token": log_tok,
            "logfile": scene.log_name,
            "vehicle": "bevcache-synth",
            "date_captured": "2020-09-13",
            "location": "bevcache-synthetic",
        }
    )
    tables["calibrated_sensor"].append(
        {
            "token": _token("calibrated_sensor", *key),
            "sensor_token": _token("sensor", "LIDAR_TOP"),
            "translation": list(LIDAR2EGO_TRANSLATION),
            "rotation": _yaw_quaternion(LIDAR2EGO_YAW),
            "camera_intrinsic": [],
        }
    )
    if rig is not None:  # nuScenes calibrates every camera per log
        tables["calibrated_sensor"].extend(
            {
                "token": _token("calibrated_sensor", *key, channel),
                "sensor_token": _token("sensor", channel),
                "translation": cam2ego[:3, 3].tolist(),
                "rotation": _quaternion(cam2ego[:3, :3]),
                "camera_intrinsic": cam2img.tolist(),
            }
            for channel, cam2ego, cam2img in zip(CAMERA_CHANNELS, rig.cam2ego, rig.cam2img, strict=True)
        )
    tables["scene"].append(
        {
            "token": _token("scene", *key),
            "log_token": log_tok,
            "nbr_samples": scene.n_samples,
            "first_sample_token": scene.sample_token(0),
            "last_sample_token": scene.sample_token(scene.n_samples - 1),
            "name": scene.name,
            "description": f"bevcache synthetic scene (seed {scene.seed}, {scene.split})",
        }
    )
    for i, obj in enumerate(scene.objects):
        tables["instance"].append(
            {
                "token": _token("instance", *key, i),
                "category_token": _token("category", scene.specs[obj.label].category),
                "nbr_annotations": scene.n_samples,
                "first_annotation_token": scene.ann_token(i, 0),
                "last_annotation_token": scene.ann_token(i, scene.n_samples - 1),
            }
        )


@dataclass(frozen=True)
class _LidarFrame:
    lidar_points: dict  # the info's `lidar_points`
    num_points: int  # in the key frame
    in_boxes: np.ndarray  # (K,) key-frame points inside each box
    sweep_infos: list[dict]  # the info's `lidar_sweeps`, newest first
    rows: list[dict]  # sample_data rows: sweeps oldest first, then the key frame


def _write_lidar_frame(out: Path, scene: _Scene, k: int, boxes: np.ndarray) -> _LidarFrame:
    """Scan and write key frame k and its sweeps."""
    key, t_us, sample_tok = scene.key, scene.t_us(k), scene.sample_token(k)
    cs_tok = _token("calibrated_sensor", *key)
    lidar2ego = scene.lidar2ego
    points, counts = _scan(boxes, scene.objects, np.random.default_rng([scene.seed, scene.split_id, scene.scene_idx, k, 0]),
                           scene.specs)
    fname = f"{scene.log_name}__LIDAR_TOP__{t_us}.pcd.bin"
    points.tofile(out / "samples" / "LIDAR_TOP" / fname)

    rows: list[dict] = []
    sweep_infos: list[dict] = []
    for j in range(scene.sweeps, 0, -1):  # oldest first in the sample_data chain
        ts_us = t_us - j * SWEEP_PERIOD_US
        sweep_pts, _ = _scan(
            _boxes_at(scene.objects, (ts_us - scene.t_base) / 1e6),
            scene.objects,
            np.random.default_rng([scene.seed, scene.split_id, scene.scene_idx, k, j]),
            scene.specs,
        )
        sname = f"{scene.log_name}__LIDAR_TOP__{ts_us}.pcd.bin"
        sweep_pts.tofile(out / "sweeps" / "LIDAR_TOP" / sname)
        sd_tok = _token("sample_data", *key, k, j)
        rows.append(_sample_data(sd_tok, sample_tok, cs_tok, ts_us, f"sweeps/LIDAR_TOP/{sname}", False))
        # The ego is parked, so a sweep's LiDAR frame is the key frame's: lidar2sensor is the identity.
        sweep_infos.insert(
            0,
            {
                "timestamp": ts_us / 1e6,
                "ego2global": scene.ego2global.tolist(),
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
    rows.append(_sample_data(sd_tok, sample_tok, cs_tok, t_us, f"samples/LIDAR_TOP/{fname}", True))
    lidar_points = {"lidar_path": fname, "lidar2ego": lidar2ego.tolist(), "num_pts_feats": NUM_PTS_FEATS}
    return _LidarFrame(lidar_points, len(points), counts, sweep_infos, rows)


def _sample_row(scene: _Scene, k: int) -> dict:
    return {
        "token": scene.sample_token(k),
        "timestamp": scene.t_us(k),
        "scene_token": _token("scene", *scene.key),
        "prev": scene.sample_token(k - 1) if k > 0 else "",
        "next": scene.sample_token(k + 1) if k + 1 < scene.n_samples else "",
    }


def _annotate(tables: dict, scene: _Scene, k: int, boxes: np.ndarray, counts: np.ndarray) -> list[dict]:
    """Append key frame k's sample_annotation rows; return its info instances."""
    lidar2global = scene.lidar2global
    instances = []
    for i, obj in enumerate(scene.objects):
        x, y, zc, length, width, height, yaw = (float(v) for v in boxes[i])
        spec = scene.specs[obj.label]
        moving = bool(np.hypot(*obj.vel) > 0.2)
        attr = spec.moving_attr if moving else spec.static_attr
        centre = lidar2global @ np.array([x, y, zc, 1.0])
        tables["sample_annotation"].append(
            {
                "token": scene.ann_token(i, k),
                "sample_token": scene.sample_token(k),
                "instance_token": _token("instance", *scene.key, i),
                "visibility_token": "",
                "attribute_tokens": [_token("attribute", attr)] if attr else [],
                "translation": [float(c) for c in centre[:3]],
                "size": [width, length, height],
                "rotation": _yaw_quaternion(yaw + LIDAR2EGO_YAW + scene.ego_yaw),
                "prev": scene.ann_token(i, k - 1) if k > 0 else "",
                "next": scene.ann_token(i, k + 1) if k + 1 < scene.n_samples else "",
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
    return instances


def _add_sensor_chains(tables: dict, scene: _Scene, chains: list[list[dict]]) -> None:
    """Link each sensor's sample_data rows (in time order) by prev/next and give each row its ego pose."""
    for rows in chains:
        for a, b in itertools.pairwise(rows):
            a["next"], b["prev"] = b["token"], a["token"]
        tables["sample_data"].extend(rows)
    tables["ego_pose"].extend(
        {
            "token": sd["token"],
            "timestamp": sd["timestamp"],
            "rotation": _yaw_quaternion(scene.ego_yaw),
            "translation": scene.ego2global[:3, 3].tolist(),
        }
        for rows in chains
        for sd in rows
    )


def _specs(cue: bool, trace: float = 0.0) -> tuple[_ClassSpec, ...]:
    """The class specs; with the camera cue, the cue classes take one shared LiDAR geometry, their
    intensities split by `trace` (0: identical)."""
    if not cue:
        return _SPECS
    intensity = _cue_intensities(trace)
    return tuple(replace(s, **{**CUE_GEOMETRY, "intensity": intensity[c]})  # type: ignore[arg-type]
                 if c in CUE_CLASSES else s for c, s in zip(CLASSES, _SPECS, strict=True))


def _cue_intensities(trace: float) -> dict[str, float]:
    shared = CUE_INTENSITY
    bicycle, motorcycle = CUE_CLASSES
    return {bicycle: shared * (1.0 - trace / 2), motorcycle: shared * (1.0 + trace / 2)}


def _cue_record(trace: float = 0.0) -> dict:
    """The cue as recorded in the summary and the info pkls' metainfo (the trace only where there is one,
    so data without it keep their bytes)."""
    record = {
        "classes": list(CUE_CLASSES),
        "colours_rgb": {c: list(CLASS_COLOURS[c]) for c in CUE_CLASSES},
        "shared_lidar_geometry": {k: list(v) if isinstance(v, tuple) else v for k, v in CUE_GEOMETRY.items()},
    }
    if trace:
        record["lidar_trace"] = {"relative_intensity_difference": trace, "intensity": _cue_intensities(trace)}
    return record


@dataclass(frozen=True)
class _Rig:
    """Cameras of one image size: matrices as the infos hold them, and each pixel-centre ray in the LiDAR frame."""

    image_size: tuple[int, int]  # (width, height)
    cam2img: tuple[np.ndarray, ...]  # (3, 3) each
    lidar2cam: tuple[np.ndarray, ...]  # (4, 4) each
    cam2ego: tuple[np.ndarray, ...]  # (4, 4) each
    origins: np.ndarray  # (V, 3) camera centres, LiDAR frame
    dirs: np.ndarray  # (V, H, W, 3) unit ray directions, LiDAR frame

    @classmethod
    def nuscenes(cls, image_size: tuple[int, int]) -> _Rig:
        width, height = image_size
        sx, sy = width / NUSCENES_IMAGE_SIZE[0], height / NUSCENES_IMAGE_SIZE[1]
        lidar2ego = _pose(LIDAR2EGO_YAW, LIDAR2EGO_TRANSLATION)
        cam2imgs, lidar2cams, cam2egos = [], [], []
        for channel in CAMERA_CHANNELS:
            translation, heading, focal = _CAMERA_MOUNTS[channel]
            h = math.radians(heading)
            cam2ego = np.eye(4)
            # OpenCV camera axes (x right, y down, z forward) as ego-frame columns.
            cam2ego[:3, :3] = np.array([[math.sin(h), 0.0, math.cos(h)],
                                        [-math.cos(h), 0.0, math.sin(h)],
                                        [0.0, -1.0, 0.0]])
            cam2ego[:3, 3] = translation
            # Focal scaled per axis keeps nuScenes' field of view at any size; principal point at the centre.
            cam2imgs.append(np.array([[focal * sx, 0.0, width / 2], [0.0, focal * sy, height / 2], [0.0, 0.0, 1.0]]))
            # The ego is parked, so camera and LiDAR share one ego pose: lidar2cam = cam2ego^-1 lidar2ego.
            lidar2cams.append(np.linalg.inv(cam2ego) @ lidar2ego)
            cam2egos.append(cam2ego)
        return cls.from_matrices(image_size, cam2imgs, lidar2cams, cam2egos)

    @classmethod
    def from_matrices(cls, image_size: tuple[int, int], cam2img, lidar2cam, cam2ego=None) -> _Rig:
        width, height = image_size
        cam2img = tuple(np.asarray(m, dtype=np.float64)[:3, :3] for m in cam2img)
        lidar2cam = tuple(np.asarray(m, dtype=np.float64) for m in lidar2cam)
        u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)  # pixel centres
        pix = np.stack([u, v, np.ones_like(u)], axis=-1)
        origins, dirs = [], []
        for k_mat, l2c in zip(cam2img, lidar2cam, strict=True):
            cam2lidar = np.linalg.inv(l2c)
            d = pix @ (cam2lidar[:3, :3] @ np.linalg.inv(k_mat)).T
            dirs.append(d / np.linalg.norm(d, axis=-1, keepdims=True))
            origins.append(cam2lidar[:3, 3])
        return cls(image_size=(width, height), cam2img=cam2img, lidar2cam=lidar2cam,
                   cam2ego=tuple(np.asarray(m, dtype=np.float64) for m in cam2ego) if cam2ego is not None else (),
                   origins=np.array(origins), dirs=np.stack(dirs))


def _background(rig: _Rig, lidar2global: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(V, H, W, 3) float RGB of the empty scene (sky; ground with a global-frame checker fading into haze)
    and (V, H, W) ray length to the ground (inf for sky)."""
    dz = rig.dirs[..., 2]
    oz = rig.origins[:, 2][:, None, None]
    with np.errstate(divide="ignore"):
        t = np.where(dz < -1e-6, (GROUND_Z - oz) / dz, np.inf)
    ground = np.isfinite(t)
    checker = np.zeros(t.shape, dtype=np.float32)
    if lidar2global is not None:  # per-coordinate arithmetic: a stacked (.., 2) @ (2, 2) is far slower here
        tg = np.where(ground, t, 0.0)
        hx = rig.origins[:, 0][:, None, None] + rig.dirs[..., 0] * tg
        hy = rig.origins[:, 1][:, None, None] + rig.dirs[..., 1] * tg
        (a, b), (c, d) = lidar2global[:2, :2]
        tx, ty = lidar2global[:2, 3]
        gx, gy = a * hx + b * hy + tx, c * hx + d * hy + ty
        checker = ((np.floor(gx / _GROUND_TILE) + np.floor(gy / _GROUND_TILE)) % 2).astype(np.float32)
    haze = (1.0 - np.exp(-t / 60.0)).astype(np.float32)[..., None]  # the far ground fades into the horizon
    rgb = (_ASPHALT.astype(np.float32) + (10.0 * checker - 5.0)[..., None]) * (1.0 - haze) \
        + _SKY_HORIZON.astype(np.float32) * haze
    up = (np.clip(dz, 0.0, 1.0) ** 0.5).astype(np.float32)[..., None]
    sky = _SKY_HORIZON.astype(np.float32) * (1.0 - up) + _SKY_TOP.astype(np.float32) * up
    # float32 images: half the copying per frame
    return np.where(ground[..., None], rgb, sky), t


def _box_corners(box: np.ndarray) -> np.ndarray:
    """(8, 3) corners of a gravity-centre (x, y, z, l, w, h, yaw) box."""
    x, y, z, length, width, height, yaw = box
    signs = np.array(list(itertools.product((-0.5, 0.5), repeat=3)))
    local = signs * np.array([length, width, height])
    c, s = math.cos(yaw), math.sin(yaw)
    return local @ np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]]) + np.array([x, y, z])


def project(points: np.ndarray, lidar2cam: np.ndarray, cam2img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) pixel coordinates and (N,) camera depths of LiDAR-frame points (mmdet3d's pinhole convention:
    pixel (u, v) spans [u, u+1) x [v, v+1))."""
    cam = points @ np.asarray(lidar2cam)[:3, :3].T + np.asarray(lidar2cam)[:3, 3]
    uvw = cam @ np.asarray(cam2img)[:3, :3].T
    with np.errstate(divide="ignore", invalid="ignore"):
        return uvw[:, :2] / uvw[:, 2:3], cam[:, 2]


def _raycast(rig: _Rig, boxes: np.ndarray, background: np.ndarray, ground_t: np.ndarray,
             colours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shade the boxes over the background with a z-buffer; return float RGB (V, H, W, 3) and object ids
    (V, H, W; -1 where no object). Each box is tested only on the pixels its projected corners span."""
    width, height = rig.image_size
    rgb, ids = background.copy(), np.full(ground_t.shape, -1, dtype=np.int32)
    depth = ground_t.copy()
    for v in range(len(rig.dirs)):
        for k, box in enumerate(boxes):
            uv, z = project(_box_corners(box), rig.lidar2cam[v], rig.cam2img[v])
            if (z <= NEAR_PLANE).all():
                continue
            if (z <= NEAR_PLANE).any():  # straddles the image plane: its projection is unbounded
                u0, u1, v0, v1 = 0, width, 0, height
            else:
                u0, v0 = (max(0, int(math.floor(a - 0.5))) for a in uv.min(axis=0))
                u1, v1 = min(width, int(math.ceil(uv[:, 0].max() + 0.5))), min(height, int(math.ceil(uv[:, 1].max() + 0.5)))
                if u0 >= u1 or v0 >= v1:
                    continue
            window = (v, slice(v0, v1), slice(u0, u1))
            t, normal_light = _slab(rig.origins[v], rig.dirs[window], box)
            hit = np.isfinite(t) & (t < depth[window])
            if not hit.any():
                continue
            depth[window] = np.where(hit, t, depth[window])
            ids[window] = np.where(hit, k, ids[window])
            shade = 0.45 + 0.55 * np.clip(normal_light, 0.0, 1.0)
            rgb[window] = np.where(hit[..., None], colours[k] * shade[..., None], rgb[window])
    return rgb, ids


def _slab(origin: np.ndarray, dirs: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray-box entry distance (inf on a miss or from inside) and the entered face's normal . sun, per ray."""
    x, y, zc, length, width, height, yaw = box
    c, s = math.cos(yaw), math.sin(yaw)
    # The box frame: rotate by -yaw about z around the centre (as _scan does for the LiDAR).
    o = ((origin[0] - x) * c + (origin[1] - y) * s, -(origin[0] - x) * s + (origin[1] - y) * c, origin[2] - zc)
    d = (dirs[..., 0] * c + dirs[..., 1] * s, -dirs[..., 0] * s + dirs[..., 1] * c, dirs[..., 2])
    sun = (_SUN[0] * c + _SUN[1] * s, -_SUN[0] * s + _SUN[1] * c, _SUN[2])
    enter, leave = np.full(dirs.shape[:-1], -np.inf), np.full(dirs.shape[:-1], np.inf)
    light = np.zeros(dirs.shape[:-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis, half in enumerate((length / 2, width / 2, height / 2)):
            ta, tb = (-half - o[axis]) / d[axis], (half - o[axis]) / d[axis]
            near = np.minimum(ta, tb)
            # Entering through this axis' face: its outward normal points against the ray.
            light = np.where(near > enter, -np.sign(d[axis]) * sun[axis], light)
            enter, leave = np.maximum(enter, near), np.minimum(leave, np.maximum(ta, tb))
    hit = (leave > enter) & (enter > 0)
    return np.where(hit, enter, np.inf), light


def render_views(boxes: np.ndarray, lidar2cam, cam2img, image_size: tuple[int, int],
                 labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render gravity-centre LiDAR-frame boxes (K, 7) into cameras given by their info matrices, without
    texture or noise: uint8 RGB (V, H, W, 3) (class paint when `labels` is given, else grey) and object
    ids (V, H, W; index into boxes, -1 where none). The same ray caster `generate` draws its JPEGs with."""
    rig = _Rig.from_matrices(_image_size(image_size), cam2img, lidar2cam)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    background, ground_t = _background(rig, None)
    if labels is None:
        colours = np.full((len(boxes), 3), 128.0)
    else:
        colours = np.array([CLASS_COLOURS[CLASSES[int(i)]] for i in labels], dtype=np.float64).reshape(-1, 3)
    rgb, ids = _raycast(rig, boxes, background, ground_t, colours)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), ids


@dataclass(frozen=True)
class _SceneLook:
    """What every frame of a scene shares: the background seen from the parked ego and each object's paint."""

    background: np.ndarray
    ground_t: np.ndarray
    colours: np.ndarray  # (K, 3) RGB

    @classmethod
    def of(cls, scene: _Scene, rig: _Rig) -> _SceneLook:
        background, ground_t = _background(rig, scene.lidar2global)
        # Its own stream: the LiDAR's generators are untouched by the cameras. A per-object brightness
        # only: the hue stays the class's, so the cue colours never drift into each other.
        rng = np.random.default_rng([scene.seed, scene.split_id, scene.scene_idx, 1000])
        gain = rng.uniform(0.8, 1.1, size=len(scene.objects))
        base = np.array([CLASS_COLOURS[CLASSES[o.label]] for o in scene.objects], dtype=np.float64).reshape(-1, 3)
        return cls(background=background, ground_t=ground_t, colours=np.clip(base * gain[:, None], 0.0, 255.0))


def _write_camera_frame(out: Path, scene: _Scene, k: int, boxes: np.ndarray, rig: _Rig, look: _SceneLook,
                        camera_sd: dict[str, list[dict]]) -> dict:
    """Render and write key frame k's six JPEGs, add their sample_data rows; return the info's `images`."""
    import cv2  # opencv-python-headless, already required by mmcv

    rgb, _ = _raycast(rig, boxes, look.background, look.ground_t, look.colours)
    rng = np.random.default_rng([scene.seed, scene.split_id, scene.scene_idx, k, 1000])
    rgb = rgb + _PIXEL_NOISE * rng.standard_normal(rgb.shape, dtype=np.float32)  # float32: half the cost
    pixels = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    t_us, width, height = scene.t_us(k), *rig.image_size
    images = {}
    for v, channel in enumerate(CAMERA_CHANNELS):
        fname = f"{scene.log_name}__{channel}__{t_us}.jpg"
        ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(pixels[v, ..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:  # not expected for a valid uint8 image; say where it failed
            raise RuntimeError(f"OpenCV could not encode {channel} of {scene.log_name} at {t_us} as JPEG.")
        (out / "samples" / channel / fname).write_bytes(jpeg.tobytes())
        sd_tok = _token("sample_data", *scene.key, k, channel)
        row = _sample_data(sd_tok, scene.sample_token(k), _token("calibrated_sensor", *scene.key, channel), t_us,
                           f"samples/{channel}/{fname}", True)
        row.update(fileformat="jpg", height=height, width=width)
        camera_sd[channel].append(row)
        # The key set and order of mmdet3d 1.4's converted infos (no lidar2img: its loaders derive it).
        images[channel] = {
            "img_path": fname,
            "cam2img": rig.cam2img[v].tolist(),
            "cam2ego": rig.cam2ego[v].tolist(),
            "sample_data_token": sd_tok,
            "timestamp": t_us / 1e6,
            "lidar2cam": rig.lidar2cam[v].tolist(),
        }
    return images


def _quaternion(rotation: np.ndarray) -> list[float]:
    """[w, x, y, z] of a proper rotation matrix (the nuScenes table convention), w >= 0."""
    m = np.asarray(rotation, dtype=np.float64)
    w = math.sqrt(max(0.0, 1.0 + m[0, 0] + m[1, 1] + m[2, 2])) / 2
    x = math.copysign(math.sqrt(max(0.0, 1.0 + m[0, 0] - m[1, 1] - m[2, 2])) / 2, m[2, 1] - m[1, 2])
    y = math.copysign(math.sqrt(max(0.0, 1.0 - m[0, 0] + m[1, 1] - m[2, 2])) / 2, m[0, 2] - m[2, 0])
    z = math.copysign(math.sqrt(max(0.0, 1.0 - m[0, 0] - m[1, 1] + m[2, 2])) / 2, m[1, 0] - m[0, 1])
    return [w, x, y, z]


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


def _static_tables(cameras: bool = False) -> dict:
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
            {"token": _token("sensor", "LIDAR_TOP"), "channel": "LIDAR_TOP", "modality": "lidar"},
            *(
                {"token": _token("sensor", c), "channel": c, "modality": "camera"}
                for c in (CAMERA_CHANNELS if cameras else ())
            ),
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
