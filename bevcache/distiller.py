"""The training-time model: a student plus CRD against cached (or, for reference, live) teacher vectors.

Registered in mmdet3d's MODELS as `CRDDistiller`, so any mmengine entry point (mmdet3d's
`tools/train.py`, `Runner.from_cfg`, `bevcache train`) trains it like a detector. It is
self-sufficient: in cached mode it takes `num_data`, the teacher widths and the pooling from the
store it opens (refusing explicit values that contradict it), clamps `nce_k`, and infers the
student widths from the first batch. What needs the training data (the dataset's tokens against
the store, the meta keys every sample must carry, the augmentation policy, the replay wiring) it
checks in `attach_train_data`, which `DistillationHook` calls at `before_train`; training without
that hook is refused at the first step, never run unchecked.

`forward` in `loss` mode returns the student's own `loss_*` entries plus `loss_crd_<layer>` =
alpha * CRD. Cached mode builds no teacher: the store's tables are loaded once onto the training
device and indexed by each sample's base dataset index (checked against the stored token) and,
when augmentation is replayed, by the view the sample shows (checked against its input digest).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from mmdet3d.registry import MODELS
from mmengine.logging import print_log
from mmengine.model import BaseModel
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from .crd import CRDLoss
from .data import batch_rows
from .errors import ConfigError, LayerError, SettingError, StoreError, StoreMismatch
from .features import POOLINGS, LayerRecorder, pool_output
from .replay import DIGEST_META, VIEW_META

# What to do with random train transforms: drop them, keep them (the cached vector then describes
# another input), or replay the store's augmented views exactly (bevcache.replay).
AUGMENTATION_POLICIES = ("auto", "drop", "keep", "replay", "warp")


def resolve_augmentation(policy: str, *, store_views: int = 0, spatial: bool = False) -> str:
    """'auto' (the default) never trains the student without its augmentation: replay the store's
    views when it has some, warp cached maps when spatial layers are distilled, else keep the random
    transforms (pooled vectors are nearly invariant to BEV flips and rotations; docs/quality)."""
    if policy != "auto":
        return policy
    return "replay" if store_views else "warp" if spatial else "keep"
# Spatial distillation settings (`spatial=dict(...)`) and their defaults.
SPATIAL_DEFAULTS = dict(layers={"pts_neck": "pts_neck"}, weight=1.0, loss="mse", normalize=True, fg_weight=1.0,
                        bg_weight=0.1, contrastive=False, contrastive_weight=0.1, tau=0.1, bev_range=None, grid=None,
                        min_radius=2, overlap=0.1, ignore_non_warpable=False, channels=None)


def _bad(key: str, allowed: str, value) -> SettingError:
    return SettingError(f"CRDDistiller: {key} must be {allowed}. Got {value!r}.")


def _number(key: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
            high_open: bool = False, integer: bool = False, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise _bad(key, allowed, value)
    if value != value or (low is not None and (value <= low if low_open else value < low)) or \
            (high is not None and (value >= high if high_open else value > high)):
        raise _bad(key, allowed, value)


def check_settings(*, alpha, feat_dim, nce_k, nce_t, nce_m, z_momentum, augmentation, views, layers, pooling) -> None:
    """Every distiller setting within its range, before anything is built (one SettingError naming the key)."""
    _number("alpha", alpha, low=0, allowed="a number >= 0 (the weight of the CRD loss)")
    _number("feat_dim", feat_dim, low=1, integer=True, allowed="an integer >= 1 (the CRD embedding width)")
    _number("nce_k", nce_k, low=1, integer=True, allowed="an integer >= 1 (negatives per sample; clamped to num_data - 1)")
    _number("nce_t", nce_t, low=0, low_open=True, allowed="a number > 0 (the NCE temperature, e.g. 0.07)")
    _number("nce_m", nce_m, low=0, high=1, high_open=True, allowed="in [0, 1) (the memory bank momentum, e.g. 0.5)")
    if z_momentum is not None:
        _number("z_momentum", z_momentum, low=0, high=1, high_open=True, allowed="None or in [0, 1)")
    if augmentation not in AUGMENTATION_POLICIES:
        raise _bad("augmentation", f"one of {list(AUGMENTATION_POLICIES)}", augmentation)
    if views is not None:
        _number("views", views, low=1, integer=True, allowed="None (from the store) or an integer >= 1")
    if layers is not None and (not isinstance(layers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in layers.items())):
        raise _bad("layers", "a dict of student layer name -> teacher layer name, e.g. dict(pts_neck='pts_neck')",
                   layers)
    given = [pooling] if isinstance(pooling, str) or pooling is None else (
        list(pooling.values()) if isinstance(pooling, dict) else [pooling])
    if any(p is not None and p not in POOLINGS for p in given):
        raise _bad("pooling", f"None (from the store), one of {list(POOLINGS)} or a dict layer -> one of them", pooling)


def check_model_cfg(model: dict) -> None:
    """check_settings on a CRDDistiller model config (absent keys: the signature's defaults), for a
    launcher that reads the settings before the distiller is built."""
    import inspect

    params = inspect.signature(CRDDistiller.__init__).parameters
    names = ("alpha", "feat_dim", "nce_k", "nce_t", "nce_m", "z_momentum", "augmentation", "views", "layers", "pooling")
    check_settings(**{n: model.get(n, params[n].default) for n in names})
    if model.get("spatial"):
        unknown = set(model["spatial"]) - set(SPATIAL_DEFAULTS) if isinstance(model["spatial"], dict) else {"?"}
        if unknown:
            raise SettingError(f"CRDDistiller: spatial must be a dict of settings among {sorted(SPATIAL_DEFAULTS)}. "
                               f"Got {model['spatial']!r}.")
        _check_spatial_values({**SPATIAL_DEFAULTS, **model["spatial"]})


def _check_spatial_values(settings: dict) -> None:
    _number("spatial.weight", settings["weight"], low=0, allowed="a number >= 0")
    from .spatial import LOSSES

    if settings["loss"] not in LOSSES:
        raise _bad("spatial.loss", f"one of {list(LOSSES)}", settings["loss"])
    if not isinstance(settings["normalize"], bool):
        raise _bad("spatial.normalize", "True (L2-normalise each cell) or False (raw features)", settings["normalize"])
    if not settings["normalize"] and settings["loss"] != "mse":
        raise _bad("spatial.loss", "'mse' when spatial.normalize=False (cosine is normalised by definition)",
                   settings["loss"])
    for key in ("fg_weight", "bg_weight", "contrastive_weight"):
        _number(f"spatial.{key}", settings[key], low=0, allowed="a number >= 0")
    if settings["fg_weight"] + settings["bg_weight"] == 0:
        raise _bad("spatial.fg_weight + spatial.bg_weight", "> 0 (some cells must count)", 0)
    _number("spatial.tau", settings["tau"], low=0, low_open=True, allowed="a number > 0")
    _number("spatial.min_radius", settings["min_radius"], low=0, integer=True, allowed="an integer >= 0")
    _number("spatial.overlap", settings["overlap"], low=0, high=1, low_open=True, high_open=True, allowed="in (0, 1)")
    grid = settings["grid"]
    if grid is not None and not (isinstance(grid, (list, tuple)) and len(grid) == 2 and all(
            isinstance(g, int) and g >= 1 for g in grid)):
        raise _bad("spatial.grid", "None (from the store) or (h, w), two integers >= 1", grid)
    layers = settings["layers"]
    if not isinstance(layers, dict) or not layers or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in layers.items()):
        raise _bad("spatial.layers", "a non-empty dict of student layer -> teacher layer", layers)


def _check_registered(student: dict) -> None:
    """A student type the registries do not know (its package never imported) is named, with the fix."""
    kind = student.get("type") if isinstance(student, dict) else None
    if isinstance(kind, str) and MODELS.get(kind) is None:
        raise ConfigError(
            f"CRDDistiller: the student's type {kind!r} is not registered in mmdet3d's MODELS: the module that "
            "defines it was never imported. Keep the config's own imports when adding bevcache, e.g. "
            "custom_imports = dict(imports=['projects.BEVFusion.bevfusion', 'bevcache']) (not imports=['bevcache'] "
            "alone, which replaces the base config's list).")


def _key(layer: str) -> str:
    return layer.replace(".", "__")


def _contradiction(name: str, given, stored, url: str) -> ConfigError:
    return ConfigError(f"CRDDistiller: {name}={given!r} in the config contradicts the store {url}, which has "
                       f"{name}={stored!r}; remove {name} from the config (it comes from the store) or use the "
                       "store it was meant for.")


@MODELS.register_module()
class CRDDistiller(BaseModel):
    """Student + per-layer CRD; the teacher side comes from a store (`cache`) or a live `teacher`."""

    def __init__(
        self,
        *,
        student: dict,
        cache: str | None = None,
        teacher: dict | None = None,
        teacher_checkpoint: str | None = None,
        trust_checkpoint: bool = False,
        layers: dict[str, str] | None = None,
        num_data: int | None = None,
        student_dims: dict[str, int] | None = None,
        teacher_dims: dict[str, int] | None = None,
        pooling: str | dict[str, str] | None = None,
        alpha: float = 1.0,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        z_momentum: float | None = None,
        augmentation: str = "auto",
        views: int | None = None,
        spatial: dict | None = None,
        teacher_inputs: tuple[str, ...] | list[str] = (),
        init_cfg: dict | None = None,
    ) -> None:
        # Data is preprocessed by the student's (and teacher's) own preprocessors in forward:
        # their voxelisation settings may differ. Ours only moves data to the device.
        super().__init__(data_preprocessor=dict(type="mmengine.BaseDataPreprocessor"), init_cfg=init_cfg)
        check_settings(alpha=alpha, feat_dim=feat_dim, nce_k=nce_k, nce_t=nce_t, nce_m=nce_m, z_momentum=z_momentum,
                       augmentation=augmentation, views=views, layers=layers, pooling=pooling)
        if (cache is None) == (teacher is None):
            raise ConfigError("CRDDistiller needs exactly one of `cache` (a store from `bevcache extract`) or "
                              "`teacher` (a teacher model config, the online reference).")
        _check_registered(student)
        self.layers = dict({"pts_neck": "pts_neck"} if layers is None else layers)  # {}: no CRD
        self.spatial_cfg = self._spatial_settings(spatial, student)
        if not self.layers and not self.spatial_cfg:
            raise ConfigError("CRDDistiller distils nothing: give `layers` (CRD) and/or `spatial` (BEV maps).")
        self.alpha = float(alpha)
        # Inputs only the online teacher reads (a fused teacher's `img` beside a LiDAR student): the
        # student never sees them (bevcache.inputs).
        self.teacher_inputs = tuple(teacher_inputs)
        num_data, teacher_dims, pooling = self._attach_teacher(cache, teacher, teacher_checkpoint, trust_checkpoint,
                                                               augmentation=augmentation, views=views, num_data=num_data,
                                                               teacher_dims=dict(teacher_dims or {}), pooling=pooling)
        self._set_pooling(pooling)
        nce_k = self._set_num_data(num_data, nce_k)
        self._build_student_and_losses(student, dict(student_dims or {}), teacher_dims,
                                       dict(feat_dim=feat_dim, nce_k=nce_k, nce_t=nce_t, nce_m=nce_m,
                                            z_momentum=z_momentum))
        from .lazy_params import LazyParamSync

        self.lazy_params = LazyParamSync(self)  # widths from the first batch, under DDP too

    # -- building ---------------------------------------------------------------------------

    def _attach_teacher(self, cache: str | None, teacher: dict | None, checkpoint: str | None, trust: bool, *,
                        augmentation: str, views: int | None, num_data: int | None, teacher_dims: dict,
                        pooling) -> tuple[int, dict, str | dict | None]:
        """The teacher side: the store (rows, widths, pooling and views come from it) or the online
        teacher; resolves `augmentation` once. Returns (num_data, teacher_dims, pooling)."""
        store = None
        if cache is not None:
            from .store import open_store

            store = open_store(cache)
        self.augmentation = resolve_augmentation(augmentation, store_views=store.num_views if store else 0,
                                                 spatial=bool(self.spatial_cfg))
        self.cache = cache
        self.replay = self.augmentation == "replay"
        self.num_views = views
        self.view_digests: np.ndarray | None = None
        self.augmentation_order: tuple[str, ...] | None = None  # the warp's recorders, set with the train data
        self.teacher: nn.Module | None = None
        self.store_tokens: list[str] | None = None
        self.data_attached = False
        self.lazy_pooled = False
        self.spatial_channels: dict[str, int] = {}
        if store is not None:
            return self._open_cache(store, num_data, teacher_dims, pooling)
        if num_data is None:
            raise ConfigError("CRDDistiller with an online `teacher` needs num_data (the training set's length; "
                              "`bevcache train` fills it in). DistillationHook checks it against the data.")
        self._build_online_teacher(dict(teacher or {}), checkpoint, trust)
        if self.spatial_cfg:
            if not self.spatial_cfg["channels"] or not self.spatial_cfg["grid"]:
                raise ConfigError("CRDDistiller with an online teacher: spatial needs channels (the teacher "
                                  "map's C) and grid ((h, w) to pool it to), as a store would record them.")
            self.spatial_channels = {t: int(self.spatial_cfg["channels"]) for t in self.spatial_cfg["layers"].values()}
        return num_data, teacher_dims, pooling

    def _set_pooling(self, pooling: str | dict | None) -> None:
        pooling = pooling or "avg"
        self.pooling = {s: pooling if isinstance(pooling, str) else pooling[s] for s in self.layers}
        bad = {s: p for s, p in self.pooling.items() if p not in POOLINGS}
        if bad:
            raise ConfigError(f"CRDDistiller: pooling must be one of {list(POOLINGS)}. Got {bad}.")

    def _set_num_data(self, num_data: int, nce_k: int) -> int:
        """Checks the row count; returns nce_k clamped below it (a small dataset has fewer negatives)."""
        self.num_data = int(num_data)
        if self.num_data < 2:
            raise ConfigError(f"CRDDistiller: CRD needs at least 2 training samples. Got num_data={self.num_data}.")
        if nce_k >= self.num_data:
            print_log(f"CRDDistiller: nce_k={nce_k} >= num_data={self.num_data}: clamped to {self.num_data - 1}",
                      logger="current", level=30)
            nce_k = self.num_data - 1
        return nce_k

    def _build_student_and_losses(self, student: dict, student_dims: dict, teacher_dims: dict, crd: dict) -> None:
        """The student, the recorder of its distilled layers, and a loss per layer (CRD, spatial)."""
        self.student = MODELS.build(copy.deepcopy(student))
        spatial_layers = dict(self.spatial_cfg.get("layers", {}))
        self.student_recorder = LayerRecorder(self.student, [*self.layers, *spatial_layers])
        if self.spatial_cfg:
            from .spatial import SpatialDistillLoss

            c = self.spatial_cfg
            self.spatial_loss = nn.ModuleDict({
                _key(s): SpatialDistillLoss(None, self.spatial_channels[t], loss=c["loss"], fg_weight=c["fg_weight"],
                                            bg_weight=c["bg_weight"], contrastive=c["contrastive"], tau=c["tau"],
                                            normalize=c["normalize"])
                for s, t in spatial_layers.items()})
        self.crd = nn.ModuleDict({
            _key(s): CRDLoss(student_dim=student_dims.get(s), teacher_dim=teacher_dims.get(t), num_data=self.num_data,
                             **crd)
            for s, t in self.layers.items()
        })

    def _spatial_settings(self, spatial: dict | None, student: dict) -> dict:
        """Spatial settings with defaults; the BEV extent defaults to the student's point cloud range."""
        if not spatial:
            return {}
        unknown = set(spatial) - set(SPATIAL_DEFAULTS)
        if unknown:
            raise SettingError(f"CRDDistiller: unknown spatial settings {sorted(unknown)}; known: {sorted(SPATIAL_DEFAULTS)}.")
        settings = {**SPATIAL_DEFAULTS, **spatial}
        _check_spatial_values(settings)
        if settings["bev_range"] is None:
            preprocessor = student.get("data_preprocessor") or {}
            # mmdet3d keeps the range in voxel_layer, BEVFusion in voxelize_cfg
            pcr = next((section.get("point_cloud_range") for section in (
                preprocessor.get("voxel_layer") or {}, preprocessor.get("voxelize_cfg") or {})
                if section.get("point_cloud_range") is not None), None)
            if pcr is None:
                raise ConfigError("CRDDistiller: spatial.bev_range (x_min, y_min, x_max, y_max in metres, the extent "
                                  "of the teacher's BEV map) is needed: the student's data_preprocessor has no "
                                  "voxel_layer.point_cloud_range or voxelize_cfg.point_cloud_range.")
            settings["bev_range"] = (pcr[0], pcr[1], pcr[3], pcr[4])
        settings["bev_range"] = tuple(float(v) for v in settings["bev_range"])
        return settings

    def _open_cache(self, store, num_data, teacher_dims: dict, pooling):
        """Everything the store decides: rows, widths, pooling; the tables themselves, on the host."""
        cache = store.url
        mask = store.complete_mask()
        if not mask.all():
            raise StoreError(f"store {cache} is incomplete ({int((~mask).sum())} of {store.num_samples} rows "
                             "missing): finish it with `bevcache extract --resume` first.")
        absent = [t for t in self.layers.values() if t not in store.layers]
        if absent:
            raise StoreError(f"teacher layer(s) {absent} are not in store {cache}; it holds {sorted(store.layers)}.")
        if num_data is not None and int(num_data) != store.num_samples:
            raise _contradiction("num_data", num_data, store.num_samples, cache)
        for t, dim in teacher_dims.items():
            if t in store.layers and int(dim) != store.layers[t].dim:
                raise _contradiction(f"teacher_dims[{t!r}]", dim, store.layers[t].dim, cache)
        stored_pooling = {s: store.layers[t].pooling for s, t in self.layers.items()}
        if pooling is not None:
            given = {s: pooling if isinstance(pooling, str) else pooling.get(s) for s in self.layers}
            for s, p in given.items():
                if p is not None and p != stored_pooling[s]:
                    raise _contradiction(f"pooling[{s!r}]", p, stored_pooling[s], cache)
        if self.replay:
            if not store.num_views:
                raise StoreError(f"augmentation='replay' needs a store with augmented views; {cache} has none. "
                                 "Extract with `bevcache extract --views K` (e.g. 4).")
            if self.num_views is not None and int(self.num_views) != store.num_views:
                raise _contradiction("views", self.num_views, store.num_views, cache)
            self.num_views = store.num_views
            self.view_record = store.attrs.get("augmentation", {})
            # Checked on the host against each sample's metainfo: no device round trip per step.
            self.view_digests = store.read_digests()
        self.store_tokens = list(store.tokens)
        self.store_fingerprint = store.attrs.get("dataset", {})
        for t in dict(self.spatial_cfg.get("layers", {})).values():
            if t not in store.spatial:
                raise StoreError(f"spatial teacher layer {t!r} is not in store {cache} (its spatial layers: "
                                 f"{sorted(store.spatial)}); extract with --spatial {t}=<grid>.")
            self.spatial_channels[t] = store.spatial[t].channels
        table_dtype = torch.float16 if store.dtype == "float16" else torch.float32
        from .loading import reads_pooled_lazily

        self.lazy_pooled, table_bytes = reads_pooled_lazily(store, set(self.layers.values()), replay=self.replay)
        print_log(f"CRDDistiller: pooled teacher table {table_bytes / 2**20:.1f} MiB "
                  + ("read per sample by the loader workers (TeacherRowsDataset)" if self.lazy_pooled
                     else "held in memory on the training device"), logger="current")
        for t in sorted(set(self.layers.values())) if not self.lazy_pooled else ():
            # Kept in the store's dtype (half the memory of float32 for a float16 store) and
            # cast per batch. Non-persistent: follows .to(device), never in checkpoints.
            table = store.read_table(t, dtype=table_dtype)
            if self.replay:  # [N, 1 + K, dim]: view 0 is the un-augmented sample
                table = torch.cat([table[:, None], store.read_table(t, dtype=table_dtype, views=True)], dim=1)
            self.register_buffer(f"teacher_table__{_key(t)}", table, persistent=False)
        return store.num_samples, {t: store.layers[t].dim for t in self.layers.values()}, stored_pooling

    def _build_online_teacher(self, teacher: dict, checkpoint: str | None, trust: bool) -> None:
        from mmengine.config import ConfigDict

        from .teacher import build_teacher

        with torch.random.fork_rng(devices=[]):  # the teacher's init must not shift the student's RNG
            self.teacher = build_teacher(ConfigDict(model=teacher), checkpoint, torch.device("cpu"),
                                         trust_checkpoint=trust, random_init=checkpoint is None)
        # The Runner calls init_weights() on the whole model: it must not re-initialise the
        # loaded teacher (nor draw random numbers for it).
        for module in self.teacher.modules():
            if hasattr(module, "is_init"):
                module.is_init = True  # type: ignore[assignment]  # mmengine's BaseModule flag
        spatial = dict(self.spatial_cfg.get("layers", {})).values()
        self.teacher_recorder = LayerRecorder(self.teacher, {*self.layers.values(), *spatial}, stop_early=True)

    # -- the training data ------------------------------------------------------------------

    def attach_train_data(self, dataset, pipeline_cfg: list) -> None:
        """Check the training data against this distiller and apply the augmentation policy
        (called by DistillationHook at before_train, before any loader worker starts);
        `pipeline_cfg` is the base train dataset's pipeline config."""
        from .wiring import check_train_data

        check_train_data(self, dataset, pipeline_cfg)
        self.data_attached = True

    def init_weights(self) -> None:
        """The student's own initialisation only: BaseModule.init_weights would also log every
        parameter's shape, which a CRD embedding sized by the first batch does not have yet; the
        loaded teacher is never re-initialised and the CRD heads initialise themselves."""
        self.student.init_weights()
        self._is_init = True

    def train(self, mode: bool = True) -> CRDDistiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: BN statistics never move
        return self

    # -- forward ----------------------------------------------------------------------------

    def _teacher_features(self, inputs: dict, data_samples: list, rows: Tensor) -> tuple[dict, dict]:
        """({teacher layer: [B, dim]}, {teacher spatial layer: [B, C, h, w]}) for the batch."""
        spatial_layers = set(self.spatial_cfg.get("layers", {}).values())
        if self.teacher is None:
            from .loading import map_field, vec_field

            views = self._checked_views(data_samples, rows.device) if self.replay else None
            if self.lazy_pooled:
                pooled = {t: torch.stack([getattr(d, vec_field(t)) for d in data_samples]).to(rows.device).float()
                          for t in set(self.layers.values())}
            else:
                where = (rows,) if views is None else (rows, views)
                pooled = {t: getattr(self, f"teacher_table__{_key(t)}")[where].float() for t in set(self.layers.values())}
            maps = {t: torch.stack([getattr(d, map_field(t)) for d in data_samples]).to(rows.device).float()
                    for t in spatial_layers}
            return pooled, maps
        data = self.teacher.data_preprocessor(  # type: ignore[operator]  # an mmengine preprocessor module
            {"inputs": inputs, "data_samples": data_samples}, False)
        with torch.no_grad():
            self.teacher_recorder.run(self.teacher, **data, mode="predict")
            outputs, batch = self.teacher_recorder.outputs, len(data_samples)
            missing = [t for t in self.teacher_recorder.layers if t not in outputs]
            if missing:
                raise LayerError(f"teacher layer(s) {missing} produced no output in the forward pass; choose a layer "
                                 "that runs, such as 'pts_neck'.")
            pooled = {t: pool_output(outputs[t], self.pooling[s], batch) for s, t in self.layers.items()}
            grid = tuple(self.spatial_cfg.get("grid") or ())
            maps = self.teacher_recorder.spatial({t: grid for t in spatial_layers}, len(data_samples))
            return pooled, maps

    def spatial_loader_settings(self) -> dict:
        """What TeacherRowsDataset's workers need to prepare each sample's maps for `_spatial_losses`
        (`TeacherRowsDataset.prepare_spatial`); complete once the train data is attached (the warp's
        augmentation order is read from the pipeline then)."""
        c = self.spatial_cfg
        return dict(bev_range=c["bev_range"], warp=self.augmentation == "warp", order=self.augmentation_order,
                    min_radius=c["min_radius"], overlap=c["overlap"])

    def _spatial_losses(self, student_maps: dict, teacher_maps: dict, data_samples: list) -> dict[str, Tensor]:
        """loss_spatial_<layer> (+ loss_spatial_nce_<layer>): teacher maps warped into each sample's
        augmented frame when augmentation='warp', weighted by the sample's GT boxes on the grid.
        The loader workers prepare both per sample when TeacherRowsDataset has `prepare` settings;
        otherwise (and for the online teacher) they are computed here, on the batch."""
        from .features import first_map

        c = self.spatial_cfg
        losses = {}
        prepared = self._prepared(data_samples)
        for s, t in c["layers"].items():
            if prepared:
                teacher, valid, fg = self._stacked_targets(t, teacher_maps[t], data_samples)
            else:
                teacher, valid, fg = self._batch_targets(teacher_maps[t], data_samples)
            student = first_map(student_maps[s], len(data_samples))  # pooled to the teacher grid by the loss
            terms = self.spatial_loss[_key(s)](student, teacher, valid, fg)
            losses[f"loss_spatial_{s}"] = c["weight"] * terms["feat"]
            if "nce" in terms:
                losses[f"loss_spatial_nce_{s}"] = c["contrastive_weight"] * terms["nce"]
        return losses

    def _prepared(self, data_samples: list) -> bool:
        """Did the loader workers warp and weigh these samples' maps, with this distiller's settings?"""
        from .loading import PREP_META, SpatialPrep

        keys = [d.metainfo.get(PREP_META) for d in data_samples] if self.teacher is None else [None]
        if all(k is None for k in keys):
            if self.teacher is None and not getattr(self, "_said_main_process", False):
                self._said_main_process = True
                print_log("CRDDistiller: spatial targets (warp, foreground) are computed on the main process: "
                          "TeacherRowsDataset has no prepare settings (TeacherRowsDataset.prepare_spatial)",
                          logger="current")
            return False
        mine = SpatialPrep.of(self.spatial_loader_settings()).key()
        wrong = next((k for k in keys if k != mine), None)
        if any(k is None for k in keys) or wrong is not None:
            raise ConfigError(f"CRDDistiller: the loader prepared the teacher maps with settings {wrong} (bev_range, "
                              f"warp, order, min_radius, overlap), but this distiller's are {mine}: give "
                              "TeacherRowsDataset prepare=<the distiller's spatial_loader_settings()>, or no prepare.")
        return True

    def _stacked_targets(self, layer: str, teacher: Tensor, data_samples: list):
        """(teacher, valid, fg) from the fields the loader workers prepared."""
        from .loading import fg_field, valid_field

        valid = None
        if self.augmentation == "warp":
            valid = torch.stack([getattr(d, valid_field(layer)) for d in data_samples]).to(teacher.device)
        fg = torch.stack([getattr(d, fg_field(layer)) for d in data_samples]).to(teacher.device)  # [B, h, w]
        return teacher, valid, fg

    def _batch_targets(self, teacher: Tensor, data_samples: list):
        """(teacher, valid, fg) computed here on the batch: the warp (cached maps, augmentation='warp')
        and the foreground heatmaps of the samples' GT boxes."""
        from .warp import bev_transform, gaussian_foreground, warp_bev

        c = self.spatial_cfg
        h, w = teacher.shape[-2:]
        valid = None
        if self.augmentation == "warp" and self.teacher is None:
            transforms = torch.as_tensor(np.stack([bev_transform(d.metainfo, self.augmentation_order)
                                                   for d in data_samples]),
                                         dtype=torch.float32, device=teacher.device)  # [B, 3, 3]
            teacher, valid = warp_bev(teacher, transforms, c["bev_range"])
        fg = torch.stack([gaussian_foreground(d.gt_instances_3d.bboxes_3d, c["bev_range"], (h, w),
                                              min_radius=c["min_radius"], overlap=c["overlap"])
                          for d in data_samples]).to(teacher.device)  # [B, h, w]
        return teacher, valid, fg

    def _checked_views(self, data_samples: list, device: torch.device) -> Tensor:
        """The view each sample shows, after proving its input is the one the teacher saw."""
        views = []
        for sample in data_samples:
            row, view = int(sample.metainfo["sample_idx"]), int(sample.metainfo.get(VIEW_META, 0))
            if view:
                assert self.view_digests is not None  # replay: read from the store in _open_cache
                stored = int(self.view_digests[row, view - 1])
                if int(sample.metainfo[DIGEST_META]) != stored:
                    raise StoreMismatch(
                        f"dataset index {row}, view {view}: the student's augmented input differs from the one "
                        f"the teacher saw when {self.cache} was made (input digest {sample.metainfo[DIGEST_META]} "
                        f"vs {stored}); the pipeline, its data or library versions changed. Re-extract the views."
                    )
            views.append(view)
        return torch.as_tensor(views, dtype=torch.long, device=device)

    def forward(self, inputs: dict, data_samples: list | None = None, mode: str = "tensor"):
        own = {k: v for k, v in inputs.items() if k not in self.teacher_inputs}
        data = self.student.data_preprocessor({"inputs": own, "data_samples": data_samples}, mode == "loss")
        if mode != "loss":
            result = self.student(**data, mode=mode)
            self.student_recorder.outputs.clear()
            return result
        if not self.data_attached:
            raise ConfigError(
                "CRDDistiller is training without DistillationHook, so nothing checked the training data against "
                "the teacher (tokens, meta keys, augmentation policy): add "
                "custom_hooks=[dict(type='DistillationHook')] to the config (bevcache train adds it).")
        assert data_samples is not None  # the loss needs the samples' metainfo (row, token, GT)
        losses = self.student(**data, mode="loss")
        batch = len(data_samples)
        missing = [n for n in self.student_recorder.layers if n not in self.student_recorder.outputs]
        if missing:
            raise LayerError(f"student layer(s) {missing} produced no output in the training forward pass (the model "
                             "never calls them on this path); choose a layer that runs, such as 'pts_neck'.")
        student_feats = {s: self._pooled_student(s, batch) for s in self.layers}
        student_maps = {s: self.student_recorder.outputs[s] for s in self.spatial_cfg.get("layers", {})}
        self.student_recorder.outputs.clear()
        device = next(self.student.parameters()).device
        rows = batch_rows(data_samples, self.store_tokens, device=device)
        teacher_feats, teacher_maps = self._teacher_features(inputs, data_samples, rows)
        for s, t in self.layers.items():
            losses[f"loss_crd_{s}"] = self.alpha * self.crd[_key(s)](student_feats[s], teacher_feats[t], rows)
        if self.spatial_cfg:
            losses.update(self._spatial_losses(student_maps, teacher_maps, data_samples))
        self.lazy_params.after_forward(self)
        return losses

    def _pooled_student(self, layer: str, batch: int) -> Tensor:
        try:
            return pool_output(self.student_recorder.outputs[layer], self.pooling[layer], batch)
        except LayerError as exc:
            raise LayerError(f"student layer {layer!r}: {exc}") from None

    def state_dict(self, *args, **kwargs):
        """Parameters still waiting for the first batch's width hold no values: they are left out
        (under DDP, mmengine broadcasts every entry before the first step)."""
        state = super().state_dict(*args, **kwargs)
        for name in [k for k, v in state.items() if isinstance(v, UninitializedParameter)]:
            del state[name]  # in place: the dict's _metadata (spconv's versions) stays
        return state

    def student_state_dict(self) -> dict[str, Tensor]:
        """The plain student's weights (with spconv's `_metadata`), loadable by the student config without bevcache."""
        from .teacher import student_state_dict

        return student_state_dict(self.state_dict())
