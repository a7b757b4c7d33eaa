"""CRDLoss: shapes, negatives, bank/Z updates, devices, learning, resume and DDP (gloo, CPU)."""

from __future__ import annotations

import copy
import io
import os
import socket
import statistics
import warnings

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from bevcache.crd import CRDLoss

from .conftest import one_intra_op_thread

DS, DT, N = 12, 20, 50  # student dim, teacher dim, dataset size of the small module


@pytest.fixture(autouse=True)
def one_thread():
    # 2 shared cores: OpenMP threads spinning against other processes make tiny ops 100x slower.
    with one_intra_op_thread():
        yield


def make(seed: int = 0, **kw) -> CRDLoss:
    torch.manual_seed(seed)
    return CRDLoss(
        **{"student_dim": DS, "teacher_dim": DT, "num_data": N, "feat_dim": 8, "nce_k": 10, **kw}
    )


def batch(b: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(N, generator=g)[:b]
    return torch.randn(b, DS, generator=g), torch.randn(b, DT, generator=g), index


def embeddings(crd: CRDLoss, f_s, f_t):
    return F.normalize(crd.embed_s(f_s), dim=1), F.normalize(crd.embed_t(f_t), dim=1)


def test_forward_returns_finite_scalar_and_gradients():
    crd = make()
    f_s, f_t, index = batch()
    f_s.requires_grad_()
    loss = crd(f_s, f_t, index)
    assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in crd.parameters())
    # Half-precision inputs are computed in float32.
    assert crd(f_s.detach().bfloat16(), f_t.half(), index).dtype == torch.float32


def test_wrong_shapes_raise():
    crd = make()
    f_s, f_t, index = batch()
    with pytest.raises(ValueError, match="index"):
        crd(f_s, f_t, index[:2])
    with pytest.raises(ValueError, match="f_t"):
        crd(f_s, f_t[None], index)


def test_state_dict_holds_banks_and_z():
    crd = make()
    state = crd.state_dict()
    assert {"memory_s", "memory_t", "z_s", "z_t"} <= state.keys()
    assert state["memory_s"].shape == state["memory_t"].shape == (N, 8)
    assert state["z_s"] < 0 and state["z_t"] < 0  # not estimated yet
    crd(*batch())
    assert crd.state_dict()["z_s"] > 0 and crd.state_dict()["z_t"] > 0


def test_banks_start_as_distinct_unit_rows():
    crd = make()
    for bank in (crd.memory_s, crd.memory_t):
        torch.testing.assert_close(bank.norm(dim=1), torch.ones(N))
    assert not torch.equal(crd.memory_s, crd.memory_t)


def test_negatives_exclude_the_positive_and_cover_the_rest_uniformly():
    n, k = 6, 5
    crd = CRDLoss(student_dim=2, teacher_dim=2, num_data=n, feat_dim=2, nce_k=k)
    index = torch.tensor([0, 3, 5]).repeat(2000)  # both ends and a middle value
    contrast = crd._contrast_indices(index)  # [B, K+1]
    assert contrast.shape == (index.numel(), k + 1)
    assert torch.equal(contrast[:, 0], index)
    negatives = contrast[:, 1:]
    assert (negatives != index[:, None]).all()
    for positive in (0, 3, 5):
        drawn = negatives[index == positive].flatten()
        counts = torch.bincount(drawn, minlength=n).float()
        assert counts[positive] == 0
        others = counts[torch.arange(n) != positive] / drawn.numel()  # each should be 1/5
        assert (others - 1 / (n - 1)).abs().max() < 0.02


def test_bank_update_follows_the_momentum_formula_and_only_touches_the_batch():
    crd = make(nce_m=0.3)
    f_s, f_t, index = batch()
    before_s, before_t = crd.memory_s.clone(), crd.memory_t.clone()
    with torch.no_grad():
        e_s, e_t = embeddings(crd, f_s, f_t)
    crd(f_s, f_t, index)
    for bank, before, emb in ((crd.memory_s, before_s, e_s), (crd.memory_t, before_t, e_t)):
        expected = F.normalize(0.3 * before[index] + 0.7 * emb, dim=1)
        torch.testing.assert_close(bank[index], expected)
        untouched = torch.ones(N, dtype=torch.bool)
        untouched[index] = False
        assert torch.equal(bank[untouched], before[untouched])


def test_duplicate_indices_take_the_last_occurrence():
    crd = make()
    f_s, f_t, _ = batch(b=3)
    index = torch.tensor([7, 2, 7])
    before = crd.memory_s.clone()
    with torch.no_grad():
        e_s, _ = embeddings(crd, f_s, f_t)
    crd(f_s, f_t, index)
    torch.testing.assert_close(crd.memory_s[7], F.normalize(0.5 * before[7] + 0.5 * e_s[2], dim=0))
    torch.testing.assert_close(crd.memory_s[2], F.normalize(0.5 * before[2] + 0.5 * e_s[1], dim=0))


def test_eval_mode_leaves_banks_and_z_alone():
    crd = make()
    crd(*batch(seed=1))
    state = copy.deepcopy(crd.state_dict())
    crd.eval()
    assert torch.isfinite(crd(*batch(seed=2)))
    for key, value in crd.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_z_is_the_first_batch_estimate_then_fixed():
    crd = make()
    f_s, f_t, index = batch()
    torch.manual_seed(5)
    contrast = crd._contrast_indices(index)
    with torch.no_grad():
        e_s, e_t = embeddings(crd, f_s, f_t)
        expected_s = torch.exp((crd.memory_t[contrast] @ e_s[:, :, None]) / 0.07).mean() * N
        expected_t = torch.exp((crd.memory_s[contrast] @ e_t[:, :, None]) / 0.07).mean() * N
    torch.manual_seed(5)  # the same negatives
    crd(f_s, f_t, index)
    torch.testing.assert_close(crd.z_s, expected_s)
    torch.testing.assert_close(crd.z_t, expected_t)
    z = crd.z_s.clone(), crd.z_t.clone()
    for seed in range(2, 6):
        crd(*batch(seed=seed))
    assert torch.equal(crd.z_s, z[0]) and torch.equal(crd.z_t, z[1])


def test_z_momentum_keeps_updating_z():
    crd = make(z_momentum=0.9)
    crd(*batch(seed=1))
    z1 = crd.z_s.clone()
    crd(*batch(seed=2))
    assert crd.z_s > 0 and not torch.equal(crd.z_s, z1)


@pytest.mark.parametrize("nce_k", [N, N + 1, 0])
def test_nce_k_outside_one_to_num_data_minus_one_raises(nce_k):
    with pytest.raises(ValueError, match="lower nce_k"):
        make(nce_k=nce_k)


def test_nce_k_of_num_data_minus_one_uses_every_other_sample():
    crd = make(nce_k=N - 1)
    assert torch.isfinite(crd(*batch()))


def test_to_float64_and_to_another_device():
    crd = make().to(torch.float64)
    assert all(t.dtype == torch.float64 for t in crd.state_dict().values() if t.is_floating_point())
    assert crd.step.dtype == torch.int64  # counters stay integers
    loss = crd(*batch())  # float32 inputs: computed in the module's dtype
    assert loss.dtype == torch.float64 and crd.z_s.dtype == torch.float64
    # Every tensor the forward creates must be on the module's device (meta: no data).
    meta = make().to("meta")
    f_s, f_t, index = (t.to("meta") for t in batch())
    assert meta(f_s, f_t, index).device.type == "meta"
    assert meta.memory_s.device.type == meta.z_s.device.type == "meta"


def test_autocast_computes_in_float32():
    crd = make()
    reference = copy.deepcopy(crd)
    f_s, f_t, index = batch()
    torch.manual_seed(3)
    expected = reference(f_s, f_t, index)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crd(f_s.bfloat16(), f_t, index)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=0)  # only the inputs were rounded
    assert crd.memory_s.dtype == torch.float32


def test_learns_a_shared_latent_structure():
    torch.manual_seed(0)
    n, latent = 256, 16
    z = torch.randn(n, latent)
    f_t = torch.tanh(z @ torch.randn(latent, 64) / 4)  # teacher: a fixed projection of z
    student = nn.Sequential(nn.Linear(latent, 64), nn.ReLU(), nn.Linear(64, 32))
    crd = CRDLoss(student_dim=32, teacher_dim=64, num_data=n, feat_dim=32, nce_k=128)
    optimizer = torch.optim.Adam([*student.parameters(), *crd.parameters()], lr=1e-2)
    losses = []
    for _ in range(100):
        index = torch.randint(0, n, (32,))
        loss = crd(student(z[index]), f_t[index], index)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert statistics.mean(losses[-10:]) < 0.3 * statistics.mean(losses[:10])
    with torch.no_grad():
        e_s = F.normalize(crd.embed_s(student(z)), dim=1)  # [n, F]
        nearest = (e_s @ crd.memory_t.T).argmax(dim=1)  # nearest teacher-bank row
    assert (nearest == torch.arange(n)).float().mean() > 0.9


def run_steps(crd: CRDLoss, steps: int = 4, seed: int = 0) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(crd.parameters(), lr=0.1)
    torch.manual_seed(seed)
    losses = []
    for step in range(steps):
        loss = crd(*batch(seed=10 + step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def test_a_fixed_seed_reproduces_losses_and_banks():
    a, b = make(seed=4), make(seed=4)
    assert torch.equal(torch.stack(run_steps(a)), torch.stack(run_steps(b)))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    c = make(seed=5)
    assert not torch.equal(torch.stack(run_steps(c)), torch.stack(run_steps(make(seed=4))))


def test_resume_from_state_dict_gives_the_identical_next_loss():
    trained = make(seed=0)
    run_steps(trained)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    resumed = make(seed=99)
    resumed.load_state_dict(torch.load(buffer))
    f_s, f_t, index = batch(seed=42)
    torch.manual_seed(7)
    expected = trained(f_s, f_t, index)
    torch.manual_seed(7)
    assert torch.equal(resumed(f_s, f_t, index), expected)
    assert torch.equal(resumed.memory_t, trained.memory_t)
    assert torch.equal(resumed.z_s, trained.z_s)


# ---- DDP: two gloo ranks on CPU ----------------------------------------------------------

# Per step, the (rank 0, rank 1) dataset indices: different batches; an index on both ranks
# (7 in step 1, with different features: the later rank must win, as in the concatenated
# batch); uneven batches in step 2, where rank 0's padding rows must not overwrite row 0.
DDP_STEPS = [
    ([0, 1, 2, 3], [10, 11, 12, 13]),
    ([4, 7, 5, 6], [7, 20, 21, 22]),
    ([0, 31, 32], [40, 41, 42, 43, 44]),
]


def ddp_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    index = torch.tensor(DDP_STEPS[step][rank])
    g = torch.Generator().manual_seed(10 * step + rank)
    return torch.randn(len(index), DS, generator=g), torch.randn(len(index), DT, generator=g), index


def ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        crd = make(seed=0)  # identical initial weights and banks on both ranks
        torch.manual_seed(100 + rank)  # different negatives per rank: the banks must not care
        for step in range(len(DDP_STEPS)):  # forward only: must match one process, both batches
            crd(*ddp_batch(step, rank))
        torch.save(copy.deepcopy(crd.state_dict()), f"{out_dir}/forward{rank}.pt")
        with warnings.catch_warnings():  # torch 2.13 deprecates it; mmengine's wrapper passes it
            warnings.simplefilter("ignore", FutureWarning)
            model = nn.parallel.DistributedDataParallel(crd, broadcast_buffers=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for step in range(len(DDP_STEPS)):  # training: gradients averaged, banks gathered
            loss = model(*ddp_batch(step, rank))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch.save(crd.state_dict(), f"{out_dir}/train{rank}.pt")
        del model
        torch_dist.barrier()  # gloo aborts a rank whose peer tears down mid-collective
    except BaseException:
        torch_dist.destroy_process_group()
        raise
    # Results are on disk. Leave without gloo's teardown: under load its background threads can
    # hit std::terminate at interpreter exit (SIGABRT seen once), which says nothing about CRD.
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_keep_identical_banks_equal_to_one_process(tmp_path):
    mp.spawn(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    forward = [torch.load(tmp_path / f"forward{r}.pt") for r in range(2)]
    train = [torch.load(tmp_path / f"train{r}.pt") for r in range(2)]
    for state in (forward, train):
        for key in ("memory_s", "memory_t", "z_s", "z_t", "embed_s.weight"):
            assert torch.equal(state[0][key], state[1][key]), key
    assert not torch.equal(train[0]["memory_s"], forward[0]["memory_s"])

    single = make(seed=0)  # one process, each step's two batches concatenated in rank order
    for step in range(len(DDP_STEPS)):
        both = zip(ddp_batch(step, 0), ddp_batch(step, 1), strict=True)
        single(*(torch.cat(pair) for pair in both))
    for key in ("memory_s", "memory_t"):
        torch.testing.assert_close(forward[0][key], single.state_dict()[key], rtol=0, atol=1e-6)


def test_negatives_are_resumable_from_the_state_dict():
    """Negatives depend on (sample_seed, step) in the state dict, not on the global RNG."""
    crd = make()
    f_s, f_t, index = batch()
    crd(f_s, f_t, index)  # one step: step counter moves
    clone = make()
    clone.load_state_dict(crd.state_dict())
    torch.manual_seed(999)  # a resumed process has another global RNG state
    a = crd._contrast_indices(index)
    torch.manual_seed(1)
    b = clone._contrast_indices(index)
    assert torch.equal(a, b)
    crd(f_s, f_t, index)
    assert not torch.equal(crd._contrast_indices(index), a)  # a new step draws new negatives


def reference(crd: CRDLoss) -> CRDLoss:
    """A copy of crd computing the loss by plain autograd through the gathered bank rows."""
    ref = copy.deepcopy(crd)
    ref._loss = ref._loss_autograd  # type: ignore[method-assign]
    return ref


def loss_and_grads(crd: CRDLoss, f_s, f_t, index) -> tuple[torch.Tensor, list[torch.Tensor]]:
    f_s = f_s.clone().requires_grad_()
    crd.zero_grad(set_to_none=True)
    loss = crd(f_s, f_t, index)
    loss.backward()
    return loss.detach(), [f_s.grad, *(p.grad for p in crd.parameters())]


@pytest.mark.parametrize(
    "kw, rows_at_once",
    [
        ({}, 4096),  # B*(K+1) = 44 < N = 50 rows: gathered, in one chunk
        ({}, 3),  # gathered 3 rows at a time: chunk edges inside each sample's K+1
        ({"nce_k": 30}, 4096),  # 124 >= 50 rows: the full-bank path
        ({"z_momentum": 0.8, "nce_m": 0.2}, 7),  # Z moves every step
    ],
)
def test_loss_and_gradients_equal_plain_autograd(monkeypatch, kw, rows_at_once):
    """_loss (scores without grad, its own gradient) == _loss_autograd, as banks and Z move."""
    monkeypatch.setattr("bevcache.crd._ROWS_AT_ONCE", rows_at_once)
    crd = make(**kw)
    ref = reference(crd)
    for step in range(4):
        f_s, f_t, index = batch(seed=20 + step)
        if step == 2:
            index[1] = index[0]  # a duplicated index in the batch
        loss, grads = loss_and_grads(crd, f_s, f_t, index)
        expected_loss, expected_grads = loss_and_grads(ref, f_s, f_t, index)
        torch.testing.assert_close(loss, expected_loss)
        for grad, expected in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # the same SGD step on both, so later steps see the same weights
            for a, b in zip(crd.parameters(), ref.parameters(), strict=True):
                a -= 0.5 * a.grad
                b -= 0.5 * b.grad
        for key in ("memory_s", "memory_t", "z_s", "z_t", "step"):
            torch.testing.assert_close(getattr(crd, key), getattr(ref, key), rtol=1e-6, atol=1e-6)


def test_gradient_reaches_only_what_requires_it():
    """Frozen teacher embed: its side adds no gradient term, the student side still matches."""
    crd = make()
    crd.embed_t.requires_grad_(False)
    ref = reference(crd)
    f_s, f_t, index = batch()
    loss, grads = loss_and_grads(crd, f_s, f_t, index)
    expected_loss, expected_grads = loss_and_grads(ref, f_s, f_t, index)
    torch.testing.assert_close(loss, expected_loss)
    for grad, expected in zip(grads, expected_grads, strict=True):
        if expected is None:
            assert grad is None
        else:
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    # No grad anywhere (evaluation): a plain value, equal to the reference's.
    crd.eval()
    ref.eval()
    with torch.no_grad():
        loss = crd(f_s, f_t, index)
        assert loss.grad_fn is None
        torch.testing.assert_close(loss, ref(f_s, f_t, index))


def test_nce_loss_grad_is_the_derivative_of_nce_loss():
    crd = make()
    x = torch.randn(3, crd.nce_k + 1, dtype=torch.float64, requires_grad=True)
    z = torch.tensor(40.0, dtype=torch.float64)
    crd._nce_loss(torch.exp(x) / z).backward()
    torch.testing.assert_close(crd._nce_loss_grad(torch.exp(x.detach()) / z), x.grad)


@pytest.mark.parametrize("rows_at_once", [1, 5, 4096])
def test_scoring_paths_agree(monkeypatch, rows_at_once):
    from bevcache.crd import _bank_scores

    monkeypatch.setattr("bevcache.crd._ROWS_AT_ONCE", rows_at_once)
    torch.manual_seed(0)
    bank, emb = torch.randn(50, 8), torch.randn(3, 8)
    small = torch.randint(0, 50, (3, 11))  # 33 < 50 rows: gathered
    large = torch.randint(0, 50, (3, 20))  # 60 >= 50 rows: full bank
    for contrast in (small, large):
        expected = torch.stack([bank[contrast[b]] @ emb[b] for b in range(3)])
        torch.testing.assert_close(_bank_scores(emb, bank, contrast), expected)
    assert _bank_scores(emb.to("meta"), bank.to("meta"), small.to("meta")).shape == small.shape


def test_duplicates_across_the_batch_take_their_last_occurrence():
    crd = make()
    f_s, f_t, _ = batch(b=6)
    index = torch.tensor([7, 2, 7, 9, 2, 7])
    before = crd.memory_t.clone()
    with torch.no_grad():
        _, e_t = embeddings(crd, f_s, f_t)
    crd(f_s, f_t, index)
    for row, last in ((7, 5), (2, 4), (9, 3)):
        expected = F.normalize(0.5 * before[row] + 0.5 * e_t[last], dim=0)
        torch.testing.assert_close(crd.memory_t[row], expected)
