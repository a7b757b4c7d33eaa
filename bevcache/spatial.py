"""Spatial distillation: match the student's BEV map to the cached teacher map, cell by cell.

The teacher map must already be in the student's (augmented) frame and on the teacher's grid:
`warp.warp_bev` gives it with its valid mask; the foreground weight comes from
`warp.gaussian_foreground` of the student's (augmented) boxes on that grid.

Per cell, features are L2-normalised over channels (`normalize=True`, the default), so the loss
compares directions, not the two networks' unrelated feature scales:
- 'mse':    |s - t|^2 summed over channels (= 2 - 2 cos(s, t) for non-zero cells);
- 'cosine': 1 - cos(s, t).
With `normalize=False` ('mse' only) the per-cell term is the raw adapted feature error, FitNets-style:
|s - t|^2 averaged over channels (a mean, so its scale does not grow with the teacher's width).
Cells are weighted by w = bg_weight + (fg_weight - bg_weight) * fg, times the valid mask, and the
loss is sum(w * loss) / sum(w) (0 when no cell carries weight). The optional contrastive term is
InfoNCE over the batch's valid foreground cells: the student's cell must pick its own teacher cell
among the other sampled foreground cells (negatives include neighbouring cells of the same object,
which look alike: expect the term to plateau above 0).

`forward` returns a dict of unweighted terms, {'feat': ..., 'nce': ...} ('nce' only with
contrastive=True), like CRDLoss returns an unweighted loss: the distiller scales and names them
(mmengine sums only keys containing 'loss').

Same loss, computed for speed (benchmarks/bench_spatial.py; `_forward_autograd` is the plain
autograd formulation it is tested against): the student map is pooled by two small matrix products
(adaptive average pooling is separable), the 1x1 adapter is one batched matrix product over the
pooled cells, and the per-cell term works from three channel sums (|s|^2, |t|^2, s.t) with its own
gradient (`_CellLoss`), so no normalised [B, C, h, w] copies are made or kept for the backward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

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
        normalize: bool = True,  # L2-normalise each cell over channels before comparing
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise SettingError(f"loss must be one of {list(LOSSES)}. Got {loss!r}.")
        if not normalize and loss != "mse":
            raise SettingError(f"normalize=False compares raw features: loss must be 'mse'. Got {loss!r}.")
        if fg_weight < 0 or bg_weight < 0 or fg_weight + bg_weight == 0:
            raise SettingError(f"fg_weight and bg_weight must be >= 0, not both 0. Got {fg_weight}, {bg_weight}.")
        if tau <= 0:
            raise SettingError(f"tau must be > 0. Got {tau}.")
        if max_cells < 2:
            raise SettingError(f"max_cells must be >= 2 (one positive, one negative). Got {max_cells}.")
        self.loss, self.fg_weight, self.bg_weight = loss, float(fg_weight), float(bg_weight)
        self.contrastive, self.tau, self.max_cells = contrastive, float(tau), int(max_cells)
        self.fg_threshold, self.normalize, self.eps = float(fg_threshold), bool(normalize), float(eps)
        # Without the student's channels (unknown before any data) the adapter is sized by the first
        # batch, as CRD's embeddings are (under DDP the distiller keeps it in step: bevcache.lazy_params).
        self.adapter = (nn.Conv2d(student_channels, teacher_channels, kernel_size=1) if student_channels
                        else nn.LazyConv2d(teacher_channels, kernel_size=1))

    def extra_repr(self) -> str:
        return (f"loss={self.loss!r}, normalize={self.normalize}, fg_weight={self.fg_weight}, "
                f"bg_weight={self.bg_weight}, contrastive={self.contrastive}, tau={self.tau}, max_cells={self.max_cells}")

    def forward(
        self, student: Tensor, teacher: Tensor, valid: Tensor | None = None, fg: Tensor | None = None
    ) -> dict[str, Tensor]:
        """student [B, Cs, Hs, Ws], teacher [B, Ct, h, w], valid / fg [B, 1, h, w] or [B, h, w] -> terms."""
        b, ct, h, w = self._check(student, teacher)
        valid = _cells(valid, teacher, 1.0)  # [B, 1, h, w]
        fg = _cells(fg, teacher, 0.0)  # [B, 1, h, w]
        with _float32(student.device):  # the whole loss in float32, also under AMP
            # Average pooling and a 1x1 conv are both linear per cell and commute exactly;
            # pooling first runs the adapter on h*w cells instead of Hs*Ws.
            pooled = pool_to(student.float(), (h, w))  # [B, Cs, h, w]
            if isinstance(self.adapter.weight, UninitializedParameter):
                self.adapter(pooled[:1, :, :1, :1])  # sizes (and initialises) a lazy adapter, as a first call would
            weight = self.adapter.weight.view(ct, -1)  # [Ct, Cs]
            cells = pooled.flatten(2)  # [B, Cs, h*w]
            # bmm of the expanded weight: torch.matmul would copy a transposed operand both ways
            if self.adapter.bias is not None:
                s = torch.baddbmm(self.adapter.bias[:, None].expand(b, ct, h * w), weight.expand(b, *weight.shape), cells)
            else:
                s = torch.bmm(weight.expand(b, *weight.shape), cells)  # [B, Ct, h*w]
            t = teacher.detach().float().flatten(2)  # [B, Ct, h*w]
            if self.normalize:
                per_cell = _CellLoss.apply(s, t, self.loss == "mse", self.eps)  # [B, h*w]
            else:
                per_cell = (s - t).square().mean(1)  # [B, h*w]
            cell_weight = ((self.bg_weight + (self.fg_weight - self.bg_weight) * fg) * valid).flatten(1)  # [B, h*w]
            terms = {"feat": (cell_weight * per_cell).sum() / cell_weight.sum().clamp_min(self.eps)}
            if self.contrastive:
                keep = ((fg > self.fg_threshold) & (valid > 0)).flatten(1)  # [B, h*w]
                s_cells = F.normalize(s.transpose(1, 2)[keep], dim=1)  # [n, Ct] in (sample, row, column) order
                t_cells = F.normalize(t.transpose(1, 2)[keep], dim=1)  # [n, Ct]
                terms["nce"] = self._info_nce(s_cells, t_cells, s)
        return terms

    def _forward_autograd(
        self, student: Tensor, teacher: Tensor, valid: Tensor | None = None, fg: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The same terms by plain autograd over normalised maps: the reference `forward` is tested
        and benchmarked against."""
        b, ct, h, w = self._check(student, teacher)
        valid = _cells(valid, teacher, 1.0)
        fg = _cells(fg, teacher, 0.0)
        with _float32(student.device):
            pooled = F.adaptive_avg_pool2d(student.float(), (h, w))
            raw_s, raw_t = self.adapter(pooled), teacher.detach().float()  # [B, Ct, h, w]
            s, t = F.normalize(raw_s, dim=1), F.normalize(raw_t, dim=1)  # InfoNCE compares unit cells either way
            if not self.normalize:
                per_cell = (raw_s - raw_t).square().mean(1, keepdim=True)
            elif self.loss == "mse":
                per_cell = (s - t).square().sum(1, keepdim=True)
            else:
                per_cell = 1 - (s * t).sum(1, keepdim=True)
            weight = (self.bg_weight + (self.fg_weight - self.bg_weight) * fg) * valid
            terms = {"feat": (weight * per_cell).sum() / weight.sum().clamp_min(self.eps)}
            if self.contrastive:
                keep = ((fg > self.fg_threshold) & (valid > 0))[:, 0]
                terms["nce"] = self._info_nce(s.permute(0, 2, 3, 1)[keep], t.permute(0, 2, 3, 1)[keep], s)
        return terms

    @staticmethod
    def _check(student: Tensor, teacher: Tensor) -> tuple[int, int, int, int]:
        if student.ndim != 4 or teacher.ndim != 4 or student.shape[0] != teacher.shape[0]:
            raise ValueError(f"expected student [B, Cs, Hs, Ws] and teacher [B, Ct, h, w]. Got "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}.")
        b, ct, h, w = teacher.shape
        return b, ct, h, w

    def _info_nce(self, s_cells: Tensor, t_cells: Tensor, graph: Tensor) -> Tensor:
        """InfoNCE of the kept cells' unit [n, C] student and teacher vectors; positive = same cell.
        `graph`: a tensor of the student's graph, for a zero that keeps it when n < 2."""
        n = s_cells.shape[0]
        if n < 2:  # no negatives: a zero that keeps the graph (DDP needs every parameter used)
            return graph.sum() * 0
        if n > self.max_cells:
            pick = torch.randperm(n, device=s_cells.device)[: self.max_cells]
            s_cells, t_cells, n = s_cells[pick], t_cells[pick], self.max_cells
        logits = s_cells @ t_cells.T / self.tau  # [n, n], diagonal = positives
        return F.cross_entropy(logits, torch.arange(n, device=s_cells.device))


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


def _float32(device: torch.device) -> contextlib.AbstractContextManager:
    """No autocast on this device type (the loss's maths stays float32 under AMP)."""
    return torch.autocast(device.type, enabled=False) if device.type != "meta" else contextlib.nullcontext()


def _pool_matrix(n_in: int, n_out: int) -> Tensor:
    """[n_out, n_in] float32: row i averages the inputs of adaptive_avg_pool's window i
    (floor(i * n_in / n_out) to ceil((i + 1) * n_in / n_out))."""
    i = torch.arange(n_out)
    start, end = (i * n_in) // n_out, ((i + 1) * n_in + n_out - 1) // n_out
    j = torch.arange(n_in)
    inside = (j >= start[:, None]) & (j < end[:, None])
    return inside.float() / (end - start).float()[:, None]


def pool_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """adaptive_avg_pool2d of [B, C, H, W] to (h, w) as two matrix products (its windows are
    separable): the same values to float rounding, and on the CPU a cheaper backward."""
    h, w = size
    rows, cols = x.shape[-2:]
    if (rows, cols) == (h, w):
        return x
    lead = x.shape[:-2]
    if cols != w:
        x = torch.matmul(x, _pool_matrix(cols, w).to(x.device, x.dtype).T)  # [B, C, H, w]: one folded mm
    if rows != h:
        pool = _pool_matrix(rows, h).to(x.device, x.dtype)  # [h, H]
        planes = x.reshape(-1, rows, w)  # [B*C, H, w]
        x = torch.bmm(pool.expand(planes.shape[0], h, rows), planes).view(*lead, h, w)  # no transposed copies
    return x


class _CellLoss(torch.autograd.Function):
    """Per-cell |s/|s| - t/|t||^2 (mse) or 1 - cos(s, t) (cosine) of [B, C, n] maps -> [B, n], with
    F.normalize's clamp (|x| -> max(|x|, eps)), from the channel sums |s|^2, |t|^2, s.t; the
    gradient w.r.t. s is A * s + b * t per cell (derived in the backward), so only s, t and [B, n]
    sums are kept."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, mse: bool, eps: float) -> Tensor:
        norm_s, norm_t = torch.linalg.vector_norm(s, dim=1), torch.linalg.vector_norm(t, dim=1)  # [B, n]
        ns, nt = norm_s.clamp_min(eps), norm_t.clamp_min(eps)
        cos = (s * t).sum(1) / (ns * nt)  # [B, n]
        if mse:  # |s^|^2 + |t^|^2 - 2 s^.t^ (each squared norm is 1 unless clamped)
            per_cell = (norm_s / ns).square() + (norm_t / nt).square() - 2 * cos
        else:
            per_cell = 1 - cos
        ctx.save_for_backward(s, t, ns, nt, cos)
        ctx.mse, ctx.eps = mse, eps
        return per_cell

    @staticmethod
    def backward(ctx, grad: Tensor):
        s, t, ns, nt, cos = ctx.saved_tensors
        k = 2.0 if ctx.mse else 1.0
        # Unclamped (|s| > eps): d/ds [-k cos] = -k / (|s| |t|) * (t - (s.t / |s|^2) s).
        # Clamped (s^ = s / eps): |s^|^2 adds 2 s / eps^2 (mse); cos's s-term has no gradient.
        clamped = ns <= ctx.eps
        a = torch.where(clamped, 2.0 / ctx.eps**2 if ctx.mse else 0.0, k * cos / ns.square())  # [B, n]
        b = -k / (ns * nt)  # [B, n]
        grad_s = torch.addcmul(s * (grad * a)[:, None], t, (grad * b)[:, None])  # [B, C, n]
        return grad_s, None, None, None
