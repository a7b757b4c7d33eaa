"""CRD (Contrastive Representation Distillation, Tian et al., ICLR 2020) for one distilled layer.

The student's and the (cached) teacher's pooled feature vectors are embedded into a shared
`feat_dim` sphere. Each side is scored against `nce_k` negatives read from a memory bank of the
*other* side (one row per dataset sample) and trained with the paper's NCE loss (eq. 18).

Written from the paper; differences from the reference implementation (RepDistiller):
- negatives never include the positive's own index (the reference may draw it);
- the normalisation constant Z, the banks and every other piece of state are buffers, so
  they are checkpointed and restored on resume (the reference re-estimates Z after a resume);
- under DDP, every rank gathers all ranks' embeddings before updating the banks, so the banks
  stay identical on all ranks (the reference lets each rank's banks drift apart), and the
  first-batch Z is averaged over all ranks;
- the maths runs in the banks' dtype (float32) even under autocast: exp(1 / 0.07) ~ 1.6e6
  overflows float16.

Same loss and gradients, computed differently: the forward works out the gradient w.r.t. the
embeddings itself (see `CRDLoss._loss`), so no [B, K+1, feat_dim] copy of bank rows is kept for
the backward (32 MiB per side at B=4, nce_k=16384: on the CPU, allocating that much fresh memory
every step cost more than all of the step's maths; benchmarks/bench_crd.py).
"""

from __future__ import annotations

import contextlib
import math

import mmengine.dist as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import SettingError


class CRDLoss(nn.Module):
    """CRD for one distilled layer: student/teacher embeds + two memory banks + NCE loss."""

    def __init__(
        self,
        *,
        student_dim: int | None,  # None: inferred from the first batch (nn.LazyLinear)
        teacher_dim: int | None,
        num_data: int,
        feat_dim: int = 128,  # size of the shared embedding space
        nce_k: int = 16384,  # negatives per sample
        nce_t: float = 0.07,  # temperature of exp(<bank_row, emb> / T)
        nce_m: float = 0.5,  # bank momentum: row = m * row + (1 - m) * emb
        z_momentum: float | None = None,  # None: Z fixed after the first batch; else the EMA
        # weight of the old Z: Z = z_momentum * Z + (1 - z_momentum) * batch estimate
        eps: float = 1e-7,
    ) -> None:
        super().__init__()
        if not 1 <= nce_k <= num_data - 1:
            raise SettingError(
                f"nce_k must be in [1, num_data - 1] = [1, {num_data - 1}]. Got nce_k={nce_k}; "
                f"lower nce_k (negatives are drawn from the other {num_data - 1} samples)."
            )
        if nce_t <= 0:
            raise SettingError(f"nce_t must be > 0. Got {nce_t}.")
        if not 0 <= nce_m < 1:
            raise SettingError(f"nce_m must be in [0, 1). Got {nce_m}.")
        if z_momentum is not None and not 0 <= z_momentum < 1:
            raise SettingError(f"z_momentum must be None or in [0, 1). Got {z_momentum}.")
        self.num_data, self.feat_dim, self.nce_k = num_data, feat_dim, nce_k
        self.nce_t, self.nce_m, self.z_momentum, self.eps = nce_t, nce_m, z_momentum, eps

        # Without the student's width (unknown before any data), both embeddings are inferred from
        # the first batch (nn.LazyLinear), so cached and online runs draw their initial weights at
        # the same moment. Under DDP the distiller keeps them in step itself (bevcache.lazy_params).
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        lazy = not (student_dim and teacher_dim)
        self.embed_s = nn.LazyLinear(feat_dim) if lazy else nn.Linear(int(student_dim or 0), feat_dim)
        self.embed_t = nn.LazyLinear(feat_dim) if lazy else nn.Linear(int(teacher_dim or 0), feat_dim)  # trained too
        # Uniform in [-stdv, stdv] has E|row|^2 = 1, as in the reference; we then normalise each
        # row exactly, so that never-visited rows live on the same unit sphere as updated rows
        # and as the embeddings (a bank row is always a unit vector).
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        for name in ("memory_s", "memory_t"):
            bank = torch.empty(num_data, feat_dim).uniform_(-stdv, stdv)  # [N, F]
            self.register_buffer(name, F.normalize(bank, dim=1))
        # Z < 0 means "not estimated yet"; buffers, so a resumed run keeps its Z.
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        # Negatives come from a generator re-seeded from (seed, step, rank) each step rather than
        # from the global RNG: a resumed run draws exactly the negatives the uninterrupted run
        # would have, because seed and step are checkpointed with the banks.
        self.register_buffer("sample_seed", torch.randint(0, 2**31 - 1, ()))
        self.register_buffer("step", torch.tensor(0))

    memory_s: Tensor  # [N, F] student bank: scored against teacher embeddings
    memory_t: Tensor  # [N, F] teacher bank: scored against student embeddings
    z_s: Tensor
    z_t: Tensor
    sample_seed: Tensor
    step: Tensor

    def extra_repr(self) -> str:
        return (
            f"num_data={self.num_data}, feat_dim={self.feat_dim}, nce_k={self.nce_k}, "
            f"nce_t={self.nce_t}, nce_m={self.nce_m}, z_momentum={self.z_momentum}"
        )

    def forward(self, f_s: Tensor, f_t: Tensor, index: Tensor) -> Tensor:
        """Loss (student side + teacher side, unweighted); in training mode, updates banks and Z."""
        batch = f_s.shape[0]
        if f_s.ndim != 2 or f_t.ndim != 2 or f_t.shape[0] != batch or index.shape != (batch,):
            raise ValueError(
                "expected f_s [B, student_dim], f_t [B, teacher_dim], index [B]. Got "
                f"{tuple(f_s.shape)}, {tuple(f_t.shape)}, {tuple(index.shape)}."
            )
        for side, dim, f in (("student", self.student_dim, f_s), ("teacher", self.teacher_dim, f_t)):
            if dim and f.shape[1] != dim:
                raise ValueError(f"CRD was built for {side} features of width {dim}. Got {f.shape[1]}.")
        dtype, device = self.memory_s.dtype, self.memory_s.device
        index = index.to(device=device, dtype=torch.long)  # [B] dataset indices
        no_autocast = (  # the meta device has no autocast to switch off
            torch.autocast(device.type, enabled=False)
            if device.type != "meta"
            else contextlib.nullcontext()
        )
        with no_autocast:  # float16 would overflow: exp(1 / 0.07) ~ 1.6e6
            e_s = F.normalize(self.embed_s(f_s.to(dtype)), dim=1)  # [B, F]
            e_t = F.normalize(self.embed_t(f_t.to(dtype)), dim=1)  # [B, F]
            contrast = self._contrast_indices(index)  # [B, K+1], column 0 = positive
            loss = self._loss(e_s, e_t, contrast)
            if self.training:
                self._update_banks(e_s.detach(), e_t.detach(), index)
                self.step += 1
        return loss

    def _contrast_indices(self, index: Tensor) -> Tensor:
        """[B] positives -> [B, K+1]: the positive, then K uniform draws from the other N-1."""
        shape, device = (index.shape[0], self.nce_k), index.device
        generator = None
        if device.type != "meta":  # (the meta device has no generator; its draws are not real)
            generator = torch.Generator(device=device)
            generator.manual_seed((int(self.sample_seed) * 1_000_003 + int(self.step)) * 4099 + dist.get_rank())
        neg = torch.randint(0, self.num_data - 1, shape, device=device, generator=generator)  # [B, K] in [0, N-1)
        neg += (neg >= index[:, None]).long()  # skip the positive: [0, N) \ {index}
        return torch.cat([index[:, None], neg], dim=1)

    @torch.no_grad()
    def _normalisers(self, scores_s: Tensor, scores_t: Tensor) -> tuple[Tensor, Tensor]:
        """Z per side: mean score * N on the first batch, then fixed (or an EMA with z_momentum)."""
        # Sums and counts are all-reduced so every rank gets the same Z, exactly the mean over
        # the global batch even if ranks' batch sizes differ. No host sync: torch.where.
        count = scores_s.new_tensor(scores_s.numel())
        stats = torch.stack([scores_s.sum(), scores_t.sum(), count])  # [3]
        dist.all_reduce(stats)  # no-op unless distributed
        estimate = stats[:2] / stats[2] * self.num_data  # [2]
        z = torch.stack([self.z_s, self.z_t])  # [2]
        if self.z_momentum is not None:
            z_next = self.z_momentum * z + (1 - self.z_momentum) * estimate
        else:
            z_next = z
        z = torch.where(z < 0, estimate, z_next)
        if self.training:
            self.z_s.copy_(z[0])
            self.z_t.copy_(z[1])
        return z[0], z[1]

    def _loss(self, e_s: Tensor, e_t: Tensor, contrast: Tensor) -> Tensor:
        """Student side + teacher side NCE loss, with its exact gradient w.r.t. e_s and e_t.

        Each side scores its B embeddings against B*(K+1) rows of the other side's bank. Autograd
        through bank[contrast] would keep those rows for the backward: a fresh [B, K+1, F] tensor
        per side (32 MiB at B=4, K=16384, F=128), and on the CPU allocating and filling that much
        fresh memory costs more than all the arithmetic (benchmarks/bench_crd.py). The backward
        cannot read the bank again instead: the bank is updated in place before it runs. So the
        scores are computed without grad, a few thousand rows at a time (`_bank_scores`), and the
        gradient w.r.t. each embedding, a weighted sum of its K+1 bank rows, is read here while
        the bank is unchanged and handed to autograd as a term of value zero. `_loss_autograd`
        is the same loss by plain autograd (the tests compare the two).
        """
        x_s = _bank_scores(e_s.detach(), self.memory_t, contrast) / self.nce_t  # [B, K+1]
        x_t = _bank_scores(e_t.detach(), self.memory_s, contrast) / self.nce_t  # [B, K+1]
        scores_s, scores_t = torch.exp(x_s), torch.exp(x_t)  # [B, K+1] each
        z_s, z_t = self._normalisers(scores_s, scores_t)  # scalars
        p_s, p_t = scores_s / z_s, scores_t / z_t  # [B, K+1] model probabilities
        loss = self._nce_loss(p_s) + self._nce_loss(p_t)
        for e, bank, p in ((e_s, self.memory_t, p_s), (e_t, self.memory_s, p_t)):
            if e.requires_grad:
                # x[b, k] = <bank[contrast[b, k]], e[b]> / T, so
                # d loss / d e[b] = sum_k d loss / d x[b, k] * bank[contrast[b, k]] / T
                weight = self._nce_loss_grad(p) / self.nce_t  # [B, K+1]
                grad = F.embedding_bag(contrast, bank, per_sample_weights=weight, mode="sum")
                loss = loss + ((e - e.detach()) * grad).sum()  # + 0, with gradient grad [B, F]
        return loss

    def _loss_autograd(self, e_s: Tensor, e_t: Tensor, contrast: Tensor) -> Tensor:
        """`_loss` by plain autograd through the gathered rows (reference of tests, benchmarks)."""
        # bank[contrast] is a copy, never the bank itself: the bank can be updated in place later.
        x_s = torch.einsum("bkf,bf->bk", self.memory_t[contrast], e_s) / self.nce_t  # [B, K+1]
        x_t = torch.einsum("bkf,bf->bk", self.memory_s[contrast], e_t) / self.nce_t  # [B, K+1]
        scores_s, scores_t = torch.exp(x_s), torch.exp(x_t)  # [B, K+1] each
        z_s, z_t = self._normalisers(scores_s.detach(), scores_t.detach())  # scalars
        return self._nce_loss(scores_s / z_s) + self._nce_loss(scores_t / z_t)

    def _nce_loss(self, p: Tensor) -> Tensor:
        """NCE loss (paper eq. 18) of [B, K+1] model probabilities, column 0 = positive."""
        m_pn = self.nce_k / self.num_data  # m * Pn: the noise mass of K uniform negatives
        log_d1 = torch.log(p[:, 0] / (p[:, 0] + m_pn + self.eps))  # [B] positive is data
        log_d0 = torch.log(m_pn / (p[:, 1:] + m_pn + self.eps))  # [B, K] negatives are noise
        return -(log_d1.sum() + log_d0.sum()) / p.shape[0]

    def _nce_loss_grad(self, p: Tensor) -> Tensor:
        """d `_nce_loss(p)` / d x, [B, K+1], where p = exp(x) / Z with Z a constant (dp/dx = p)."""
        c = self.nce_k / self.num_data + self.eps  # m * Pn + eps
        grad = p / (p + c)  # [B, K+1] negatives: d(-log(m Pn / (p + c)))/dx = p / (p + c)
        grad[:, 0] = -c / (p[:, 0] + c)  # positive: d(-log(p / (p + c)))/dx = -c / (p + c)
        return grad / p.shape[0]

    @torch.no_grad()
    def _update_banks(self, e_s: Tensor, e_t: Tensor, index: Tensor) -> None:
        """Momentum-update the touched rows with every rank's embeddings (identical on all ranks)."""
        emb, index = _all_gather_rows(torch.cat([e_s, e_t], dim=1), index)  # [n, 2F], [n]
        # A duplicated index takes the embedding of its last occurrence (in rank order), so all
        # its copies write the same row and index_copy_ is deterministic; no host sync needed.
        # (n x n comparisons: an [N] lookup table would cost more at N = 200k than the update.)
        position = torch.arange(index.shape[0], device=index.device)  # [n]
        same = index[:, None] == index[None, :]  # [n, n]
        last = torch.where(same, position, -1).amax(dim=1)  # [n] each index's last position
        rows_s, rows_t = emb[last].split(self.feat_dim, dim=1)  # [n, F] each
        for bank, rows in ((self.memory_s, rows_s), (self.memory_t, rows_t)):
            mixed = self.nce_m * bank[index] + (1 - self.nce_m) * rows  # [n, F]
            bank.index_copy_(0, index, F.normalize(mixed, dim=1))


_ROWS_AT_ONCE = 4096  # bank rows `_bank_scores` gathers at a time on the CPU: 2 MiB at F=128


@torch.no_grad()
def _bank_scores(emb: Tensor, bank: Tensor, contrast: Tensor) -> Tensor:
    """<bank[contrast[b, k]], emb[b]> as [B, K+1] (no grad), by the cheaper of two equal ways.

    Scoring all N bank rows and keeping K+1 per sample wins once B*(K+1) >= N. Otherwise the
    B*(K+1) rows are gathered. Off the CPU in one go; on the CPU _ROWS_AT_ONCE at a time, since a
    fresh [B, K+1, F] tensor above glibc's mmap threshold (32 MiB) is mapped and page-faulted in
    anew on every call (30x slower than reused memory). The gather is embedding_bag with bags of
    one row: on the CPU its kernel prefetches rows, faster here than index_select.
    """
    if contrast.numel() >= bank.shape[0]:
        return (emb @ bank.T).gather(1, contrast)  # [B, N] scores -> [B, K+1]
    if bank.device.type != "cpu":
        return torch.einsum("bkf,bf->bk", bank[contrast], emb)  # [B, K+1, F] gathered rows
    scores = emb.new_empty(contrast.shape)  # [B, K+1]
    for b in range(contrast.shape[0]):
        for j in range(0, contrast.shape[1], _ROWS_AT_ONCE):
            index = contrast[b, j : j + _ROWS_AT_ONCE]  # [r]
            rows = F.embedding_bag(index[:, None], bank, mode="sum")  # [r, F] = bank[index]
            scores[b, j : j + _ROWS_AT_ONCE] = rows @ emb[b]
    return scores


def _all_gather_rows(*xs: Tensor) -> list[Tensor]:
    """Each x [n_r, ...] with the rows of every rank, concatenated in rank order; n_r may differ."""
    if dist.get_world_size() == 1:
        return list(xs)
    n = torch.tensor([xs[0].shape[0]], device=xs[0].device)
    sizes = [int(n_r) for n_r in dist.all_gather(n)]
    gathered = []
    for x in xs:
        padded = x.new_zeros((max(sizes), *x.shape[1:]))  # the collective needs equal shapes
        padded[: x.shape[0]] = x
        parts = dist.all_gather(padded)
        gathered.append(torch.cat([part[:n_r] for part, n_r in zip(parts, sizes, strict=True)]))
    return gathered
