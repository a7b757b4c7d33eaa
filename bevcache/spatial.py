"""Spatial distillation: match the student's BEV map to the cached teacher map, cell by cell.

The teacher map must already be in the student's (augmented) frame and on the teacher's grid:
`warp.warp_bev` gives it with its valid mask; the foreground weight comes from
`warp.gaussian_foreground` of the student's (augmented) boxes on that grid.

Per cell, features are L2-normalised over channels, so the loss compares directions, not the two
networks' unrelated feature scales:
- 'mse':    |s - t|^2 summed over channels (= 2 - 2 cos(s, t) for non-zero cells);
- 'cosine': 1 - cos(s, t).
Cells are weighted by w = bg_weight + (fg_weight - bg_weight) * fg, times the valid mask, and the
loss is sum(w * loss) / sum(w) (0 when no cell carries weight). The optional contrastive term is
InfoNCE over the batch's valid foreground cells: the student's cell must pick its own teacher cell
among the other sampled foreground cells (negatives include neighbouring cells of the same object,
which look alike: expect the term to plateau above 0).

`forward` returns a dict of unweighted terms, {'feat': ..., 'nce': ...} ('nce' only with
contrastive=True), like CRDLoss returns an unweighted loss: the distiller scales and names them
(mmengine sums only keys containing 'loss').
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import SettingError

LOSSES = ("mse", "cosine")


class SpatialDistillLoss(nn.Module):
    """1x1 adapter student -> teacher channels, pooled to the teacher grid; weighted per-cell loss."""

    def __init__(
        self,
        student_channels: int | None,
        teacher_channels: int,
        *,
        loss: str = "mse",
        fg_weight: float = 1.0,  # weight of a cell at a box centre (fg = 1)
        bg_weight: float = 0.1,  # weight of a background cell (fg = 0)
        contrastive: bool = False,
        tau: float = 0.1,  # InfoNCE temperature
        max_cells: int = 1024,  # foreground cells per batch in InfoNCE (random subset beyond)
        fg_threshold: float = 0.5,  # fg above this makes a cell foreground for InfoNCE
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise SettingError(f"loss must be one of {list(LOSSES)}. Got {loss!r}.")
        if fg_weight < 0 or bg_weight < 0 or fg_weight + bg_weight == 0:
            raise SettingError(f"fg_weight and bg_weight must be >= 0, not both 0. Got {fg_weight}, {bg_weight}.")
        if tau <= 0:
            raise SettingError(f"tau must be > 0. Got {tau}.")
        if max_cells < 2:
            raise SettingError(f"max_cells must be >= 2 (one positive, one negative). Got {max_cells}.")
        self.loss, self.fg_weight, self.bg_weight = loss, float(fg_weight), float(bg_weight)
        self.contrastive, self.tau, self.max_cells = contrastive, float(tau), int(max_cells)
        self.fg_threshold, self.eps = float(fg_threshold), float(eps)
        # Without the student's channels (unknown before any data) the adapter is sized by the first
        # batch, as CRD's embeddings are (under DDP the distiller keeps it in step: bevcache.lazy_params).
        self.adapter = (nn.Conv2d(student_channels, teacher_channels, kernel_size=1) if student_channels
                        else nn.LazyConv2d(teacher_channels, kernel_size=1))

    def extra_repr(self) -> str:
        return (f"loss={self.loss!r}, fg_weight={self.fg_weight}, bg_weight={self.bg_weight}, "
                f"contrastive={self.contrastive}, tau={self.tau}, max_cells={self.max_cells}")

    def forward(
        self, student: Tensor, teacher: Tensor, valid: Tensor | None = None, fg: Tensor | None = None
    ) -> dict[str, Tensor]:
        """student [B, Cs, Hs, Ws], teacher [B, Ct, h, w], valid / fg [B, 1, h, w] or [B, h, w] -> terms."""
        b, _, h, w = teacher.shape
        if student.ndim != 4 or teacher.ndim != 4 or student.shape[0] != b:
            raise ValueError(f"expected student [B, Cs, Hs, Ws] and teacher [B, Ct, h, w]. Got "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}.")
        valid = _cells(valid, teacher, 1.0)  # [B, 1, h, w]
        fg = _cells(fg, teacher, 0.0)  # [B, 1, h, w]
        device = student.device
        no_autocast = (torch.autocast(device.type, enabled=False) if device.type != "meta"
                       else contextlib.nullcontext())
        with no_autocast:  # the whole loss in float32, also under AMP
            # Average pooling and a 1x1 conv are both linear per cell and commute exactly;
            # pooling first runs the adapter on h*w cells instead of Hs*Ws.
            pooled = F.adaptive_avg_pool2d(student.float(), (h, w))  # [B, Cs, h, w]
            s = F.normalize(self.adapter(pooled), dim=1)  # [B, Ct, h, w]
            t = F.normalize(teacher.detach().float(), dim=1)  # [B, Ct, h, w]
            if self.loss == "mse":
                per_cell = (s - t).square().sum(1, keepdim=True)  # [B, 1, h, w]
            else:
                per_cell = 1 - (s * t).sum(1, keepdim=True)  # [B, 1, h, w]
            weight = (self.bg_weight + (self.fg_weight - self.bg_weight) * fg) * valid  # [B, 1, h, w]
            terms = {"feat": (weight * per_cell).sum() / weight.sum().clamp_min(self.eps)}
            if self.contrastive:
                keep = (fg > self.fg_threshold) & (valid > 0)  # [B, 1, h, w]
                terms["nce"] = self._info_nce(s, t, keep[:, 0])
        return terms

    def _info_nce(self, s: Tensor, t: Tensor, keep: Tensor) -> Tensor:
        """InfoNCE of unit [B, C, h, w] maps over the kept [B, h, w] cells; positive = same cell."""
        s_cells = s.permute(0, 2, 3, 1)[keep]  # [n, C]
        t_cells = t.permute(0, 2, 3, 1)[keep]  # [n, C]
        n = s_cells.shape[0]
        if n < 2:  # no negatives: a zero that keeps the graph (DDP needs every parameter used)
            return s.sum() * 0
        if n > self.max_cells:
            pick = torch.randperm(n, device=s.device)[: self.max_cells]
            s_cells, t_cells, n = s_cells[pick], t_cells[pick], self.max_cells
        logits = s_cells @ t_cells.T / self.tau  # [n, n], diagonal = positives
        return F.cross_entropy(logits, torch.arange(n, device=s.device))


def _cells(x: Tensor | None, like: Tensor, fill: float) -> Tensor:
    """A per-cell map as float32 [B, 1, h, w] (None -> filled with `fill`)."""
    b, _, h, w = like.shape
    if x is None:
        return torch.full((b, 1, h, w), fill, device=like.device)
    x = x.detach().float().to(like.device)
    x = x[:, None] if x.ndim == 3 else x
    if x.shape != (b, 1, h, w):
        raise ValueError(f"expected a per-cell map [B, 1, h, w] = {(b, 1, h, w)}. Got {tuple(x.shape)}.")
    return x
