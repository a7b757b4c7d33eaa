"""The training-time model: a student plus CRD against cached (or, for reference, live) teacher vectors.

Registered in mmdet3d's MODELS as `CRDDistiller`, so mmengine's Runner trains it like any
detector (optimizer wrapper, schedulers, logging, checkpoints, resume, AMP, DDP). `forward` in
`loss` mode returns the student's own `loss_*` entries plus `loss_crd_<layer>` = alpha * CRD.
Cached mode builds no teacher: the store's tables are loaded once onto the training device and
indexed by each sample's base dataset index (checked against the stored token) and, when
augmentation is replayed, by the view the sample shows (checked against the view's input digest).
"""

from __future__ import annotations

import torch
from mmdet3d.registry import MODELS
from mmengine.model import BaseModel
from torch import Tensor, nn

from .crd import CRDLoss
from .data import batch_rows
from .errors import ConfigError, StoreMismatch
from .features import LayerRecorder
from .replay import DIGEST_META, VIEW_META


def _key(layer: str) -> str:
    return layer.replace(".", "__")


@MODELS.register_module()
class CRDDistiller(BaseModel):
    """Student + per-layer CRD; the teacher side comes from a store (`cache`) or a live `teacher`."""

    def __init__(
        self,
        *,
        student: dict,
        layers: dict[str, str],
        student_dims: dict[str, int],
        teacher_dims: dict[str, int],
        num_data: int,
        pooling: str | dict[str, str] = "avg",
        alpha: float = 1.0,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        z_momentum: float | None = None,
        cache: str | None = None,
        teacher: dict | None = None,
        teacher_checkpoint: str | None = None,
        replay: bool = False,
        init_cfg: dict | None = None,
    ) -> None:
        # Data is preprocessed by the student's (and teacher's) own preprocessors in forward:
        # their voxelisation settings may differ. Ours only moves data to the device.
        super().__init__(data_preprocessor=dict(type="mmengine.BaseDataPreprocessor"), init_cfg=init_cfg)
        if alpha < 0:
            raise ConfigError(f"distill.alpha must be >= 0. Got {alpha}.")
        if (cache is None) == (teacher is None):
            raise ConfigError("CRDDistiller needs exactly one of `cache` (a store) or `teacher` (online).")
        self.layers = dict(layers)
        self.alpha = float(alpha)
        self.pooling = {s: pooling if isinstance(pooling, str) else pooling[s] for s in self.layers}
        self.student = MODELS.build(student)
        self.student_recorder = LayerRecorder(self.student, self.layers)
        self.crd = nn.ModuleDict({
            _key(s): CRDLoss(student_dim=student_dims[s], teacher_dim=teacher_dims[t], num_data=num_data,
                             feat_dim=feat_dim, nce_k=nce_k, nce_t=nce_t, nce_m=nce_m, z_momentum=z_momentum)
            for s, t in self.layers.items()
        })
        self.teacher = None
        self.view_digests = None
        if cache is not None:
            from .store import open_store

            store = open_store(cache)
            self.store_tokens = list(store.tokens)
            self.store_url = cache
            table_dtype = torch.float16 if store.dtype == "float16" else torch.float32
            for t in sorted(set(self.layers.values())):
                # Kept in the store's dtype (half the memory of float32 for a float16 store) and
                # cast per batch. Non-persistent: follows .to(device), never in checkpoints.
                table = store.read_table(t, dtype=table_dtype)
                if replay:  # [N, 1 + K, dim]: view 0 is the un-augmented sample
                    table = torch.cat([table[:, None], store.read_table(t, dtype=table_dtype, views=True)], dim=1)
                self.register_buffer(f"teacher_table__{_key(t)}", table, persistent=False)
            # Checked on the host against each sample's metainfo: no device round trip per step.
            self.view_digests = store.read_digests() if replay else None
        else:
            from .extract import build_teacher

            with torch.random.fork_rng(devices=[]):  # the teacher's init must not shift the student's RNG
                from mmengine.config import ConfigDict

                self.teacher = build_teacher(ConfigDict(model=teacher), teacher_checkpoint, torch.device("cpu"))
            # The Runner calls init_weights() on the whole model: it must not re-initialise the
            # loaded teacher (nor draw random numbers for it).
            for module in self.teacher.modules():
                if hasattr(module, "is_init"):
                    module.is_init = True
            self.teacher_recorder = LayerRecorder(self.teacher, set(self.layers.values()), stop_early=True)

    def train(self, mode: bool = True) -> CRDDistiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: BN statistics never move
        return self

    def _teacher_features(self, inputs: dict, data_samples: list, rows: Tensor) -> dict[str, Tensor]:
        if self.teacher is None:
            where = (rows,) if self.view_digests is None else (rows, self._checked_views(data_samples, rows.device))
            return {t: getattr(self, f"teacher_table__{_key(t)}")[where].float() for t in set(self.layers.values())}
        data = self.teacher.data_preprocessor({"inputs": inputs, "data_samples": data_samples}, False)
        with torch.no_grad():
            self.teacher_recorder.run(self.teacher, **data, mode="predict")
            pooling = {t: self.pooling[s] for s, t in self.layers.items()}
            return self.teacher_recorder.pooled(pooling, len(data_samples))

    def _checked_views(self, data_samples: list, device: torch.device) -> Tensor:
        """The view each sample shows, after proving its input is the one the teacher saw."""
        views = []
        for sample in data_samples:
            row, view = int(sample.metainfo["sample_idx"]), int(sample.metainfo.get(VIEW_META, 0))
            if view:
                stored = int(self.view_digests[row, view - 1])
                if int(sample.metainfo[DIGEST_META]) != stored:
                    raise StoreMismatch(
                        f"dataset index {row}, view {view}: the student's augmented input differs from the one "
                        f"the teacher saw when {self.store_url} was made (input digest {sample.metainfo[DIGEST_META]} "
                        f"vs {stored}); the pipeline, its data or library versions changed. Re-extract the views."
                    )
            views.append(view)
        return torch.as_tensor(views, dtype=torch.long, device=device)

    def forward(self, inputs: dict, data_samples: list | None = None, mode: str = "tensor"):
        data = self.student.data_preprocessor({"inputs": inputs, "data_samples": data_samples}, mode == "loss")
        if mode != "loss":
            result = self.student(**data, mode=mode)
            self.student_recorder.outputs.clear()
            return result
        losses = self.student(**data, mode="loss")
        student_feats = self.student_recorder.pooled(self.pooling, len(data_samples))
        self.student_recorder.outputs.clear()
        device = student_feats[next(iter(self.layers))].device
        rows = batch_rows(data_samples, getattr(self, "store_tokens", None), device=device)
        teacher_feats = self._teacher_features(inputs, data_samples, rows)
        for s, t in self.layers.items():
            losses[f"loss_crd_{s}"] = self.alpha * self.crd[_key(s)](student_feats[s], teacher_feats[t], rows)
        return losses

    def student_state_dict(self) -> dict[str, Tensor]:
        """The plain student's weights, loadable by the student config without bevcache."""
        return {k[len("student."):]: v for k, v in self.state_dict().items() if k.startswith("student.")}
