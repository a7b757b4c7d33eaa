"""spatial.py: the per-cell distillation loss (weights, masks, gradients, InfoNCE, float32 maths)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bevcache.spatial import SpatialDistillLoss


def _identity_loss(channels: int, **kwargs) -> SpatialDistillLoss:
    loss = SpatialDistillLoss(channels, channels, **kwargs)
    with torch.no_grad():
        loss.adapter.weight.copy_(torch.eye(channels)[:, :, None, None])
        loss.adapter.bias.zero_()
    return loss


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_zero_when_the_student_is_the_teacher(kind):
    torch.manual_seed(0)
    teacher = torch.randn(2, 6, 8, 10)
    loss = _identity_loss(6, loss=kind)
    assert loss(teacher, teacher)["feat"].abs() < 1e-6
    # a student at twice the resolution whose 2x2 blocks average to the teacher pools back exactly
    student = teacher.repeat_interleave(2, 2).repeat_interleave(2, 3)
    student = student + torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(8, 10) * 0.3
    fg = torch.rand(2, 8, 10)
    assert loss(student, teacher, torch.ones(2, 1, 8, 10), fg)["feat"].abs() < 1e-6
    assert loss(torch.randn(2, 6, 16, 20), teacher)["feat"] > 0.1


def test_gradient_reaches_adapter_and_student():
    torch.manual_seed(1)
    loss = SpatialDistillLoss(4, 6, contrastive=True)
    student = torch.randn(2, 4, 16, 16, requires_grad=True)
    fg = torch.zeros(2, 1, 8, 8)
    fg[:, :, 2:5, 2:5] = 1
    terms = loss(student, torch.randn(2, 6, 8, 8), None, fg)
    (terms["feat"] + terms["nce"]).backward()
    for grad in (student.grad, loss.adapter.weight.grad, loss.adapter.bias.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_invalid_cells_do_not_contribute():
    torch.manual_seed(2)
    loss = SpatialDistillLoss(4, 6, contrastive=True)
    student, teacher = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8)
    valid = torch.ones(2, 1, 8, 8)
    valid[1, 0, 3, 4] = 0
    fg = torch.zeros(2, 1, 8, 8)
    fg[:, 0, 2:5, 2:6] = 1  # the masked cell is foreground: InfoNCE must skip it too
    base = loss(student, teacher, valid, fg)
    changed = teacher.clone()
    changed[1, :, 3, 4] = torch.randn(6) * 100
    after = loss(student, changed, valid, fg)
    assert torch.equal(after["feat"], base["feat"]) and torch.equal(after["nce"], base["nce"])
    changed[0, :, 3, 4] = -teacher[0, :, 3, 4]  # the same cell of the other sample is valid: it counts
    assert not torch.equal(loss(student, changed, valid, fg)["feat"], base["feat"])


@pytest.mark.parametrize("kind, per_cell", [("mse", 2.0), ("cosine", 1.0)])
def test_foreground_and_background_weights(kind, per_cell):
    teacher = torch.zeros(1, 2, 4, 4)
    teacher[:, 0] = 1  # every cell points along channel 0
    student = teacher.clone()
    student[0, :, 0, 0] = torch.tensor([0.0, 1.0])  # orthogonal at a foreground cell
    student[0, :, 3, 3] = torch.tensor([0.0, 2.0])  # and at a background cell
    fg = torch.zeros(1, 4, 4)
    fg[0, 0, 0] = 1.0
    fg[0, 0, 1] = 0.5  # a half-foreground cell with zero error: weight 0.1 + 0.9 * 0.5
    loss = _identity_loss(2, loss=kind, fg_weight=1.0, bg_weight=0.1)
    total_weight = 1.0 + 0.55 + 14 * 0.1
    expected = (1.0 * per_cell + 0.1 * per_cell) / total_weight
    assert loss(student, teacher, None, fg)["feat"].item() == pytest.approx(expected, rel=1e-6)
    # without the background weight only the foreground error counts
    only_fg = _identity_loss(2, loss=kind, fg_weight=1.0, bg_weight=0.0)
    assert only_fg(student, teacher, None, fg)["feat"].item() == pytest.approx(per_cell / 1.5, rel=1e-6)


def test_no_weight_anywhere_is_zero_not_nan():
    loss = SpatialDistillLoss(3, 3, contrastive=True)
    student = torch.randn(1, 3, 4, 4, requires_grad=True)
    terms = loss(student, torch.randn(1, 3, 4, 4), torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4))
    assert terms["feat"].item() == 0 and terms["nce"].item() == 0
    (terms["feat"] + terms["nce"]).backward()
    assert torch.isfinite(student.grad).all()


def test_contrastive_term_falls_as_positives_align():
    torch.manual_seed(4)
    teacher = torch.randn(2, 32, 6, 6)
    fg = torch.zeros(2, 1, 6, 6)
    fg[:, :, 1:5, 1:5] = 0.9
    loss = _identity_loss(32, contrastive=True, tau=0.1, max_cells=64)
    noise = torch.randn(2, 32, 6, 6)
    values = [loss(mix * teacher + (1 - mix) * noise, teacher, None, fg)["nce"].item()
              for mix in (0.0, 0.5, 1.0)]
    assert values[0] > values[1] > values[2]
    assert values[0] > 2.0 and values[2] < 0.1  # chance is log(32) ~ 3.5; aligned cells are found
    assert "nce" not in _identity_loss(32)(teacher, teacher, None, fg)


def test_contrastive_subsamples_to_max_cells(monkeypatch):
    shapes = []
    cross_entropy = F.cross_entropy

    def recording(logits, target, *args, **kwargs):
        shapes.append(tuple(logits.shape))
        return cross_entropy(logits, target, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", recording)
    loss = SpatialDistillLoss(4, 4, contrastive=True, max_cells=5)
    fg = torch.zeros(2, 8, 8)
    fg[:, :3, :3] = 1  # 18 foreground cells
    terms = loss(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), None, fg)
    assert torch.isfinite(terms["nce"]) and shapes == [(5, 5)]
    loss.max_cells = 64
    loss(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), None, fg)
    assert shapes[-1] == (18, 18)


def test_float32_under_autocast():
    torch.manual_seed(5)
    loss = SpatialDistillLoss(4, 6, contrastive=True)
    student, teacher = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8).half()
    fg = torch.rand(2, 1, 8, 8)
    torch.manual_seed(6)
    plain = loss(student, teacher, None, fg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(6)
        amp = loss(student.bfloat16(), teacher, None, fg)
    assert amp["feat"].dtype == torch.float32 and amp["nce"].dtype == torch.float32
    # the only difference left is the student's own bfloat16 rounding
    torch.testing.assert_close(amp["feat"], plain["feat"], rtol=2e-2, atol=0)


def test_pooling_before_the_adapter_equals_adapting_first():
    torch.manual_seed(7)
    loss = SpatialDistillLoss(4, 6)
    student, teacher = torch.randn(1, 4, 20, 30), torch.randn(1, 6, 8, 12)  # not integer multiples
    adapted_first = F.adaptive_avg_pool2d(loss.adapter(student), (8, 12))
    s, t = F.normalize(adapted_first, dim=1), F.normalize(teacher, dim=1)
    expected = (s - t).square().sum(1).mean()
    torch.testing.assert_close(loss(student, teacher)["feat"], expected, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="loss must be"):
        SpatialDistillLoss(2, 2, loss="l1")
    with pytest.raises(ValueError, match="not both 0"):
        SpatialDistillLoss(2, 2, fg_weight=0, bg_weight=0)
    with pytest.raises(ValueError, match="per-cell map"):
        SpatialDistillLoss(2, 2)(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4), torch.ones(1, 1, 2, 2))


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_forward_equals_the_autograd_reference_in_value_and_gradients(kind):
    """The fused forward (separable pooling, bmm adapter, _CellLoss's own gradient) against plain
    autograd over normalised maps, with cells whose student or teacher vector is (clamped) zero."""
    torch.manual_seed(8)
    loss = SpatialDistillLoss(None, 12, loss=kind, contrastive=True, max_cells=40)  # lazy adapter, as the distiller's
    student = torch.randn(3, 8, 20, 30)
    student[1, :, :6, :9] = 0  # the pooled cells (0..2, 0..3) of sample 1 are zero: |s| is clamped there
    student.requires_grad_()
    teacher = torch.randn(3, 12, 9, 13)
    teacher[0, :, 2, 3] = 0  # a zero teacher cell (as warp_bev leaves outside the map)
    valid = (torch.rand(3, 1, 9, 13) > 0.2).float()
    fg = torch.rand(3, 9, 13)
    loss(student, teacher, valid, fg)  # sizes the lazy adapter (its init draws random numbers)
    assert loss.adapter.weight.shape == (12, 8, 1, 1)
    results = []
    for forward in (loss.forward, loss._forward_autograd):
        student.grad = None
        loss.zero_grad()
        torch.manual_seed(9)  # the same InfoNCE subsample
        terms = forward(student, teacher, valid, fg)
        (terms["feat"] + terms["nce"]).backward()
        results.append((terms, student.grad.clone(), loss.adapter.weight.grad.clone(), loss.adapter.bias.grad.clone()))
    (fast, *fast_grads), (ref, *ref_grads) = results
    for key in ("feat", "nce"):
        torch.testing.assert_close(fast[key], ref[key], rtol=1e-6, atol=1e-7)
    for got, expected in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("size", [(64, 64), (45, 45), (16, 16), (9, 13), (20, 30)])
def test_separable_pooling_equals_adaptive_average_pooling(size):
    from bevcache.spatial import pool_to

    x = torch.randn(2, 3, 20, 30, requires_grad=True)
    torch.testing.assert_close(pool_to(x, size), F.adaptive_avg_pool2d(x, size), rtol=1e-6, atol=1e-6)
    g = torch.randn(2, 3, *size)
    (grad,) = torch.autograd.grad(pool_to(x, size), x, g)
    (expected,) = torch.autograd.grad(F.adaptive_avg_pool2d(x, size), x, g)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-6)


def test_raw_features_without_normalisation():
    """normalize=False: the channel-mean squared error of the adapted map, scale included (a student
    at twice the teacher's scale is not a match, as it is for the normalised loss)."""
    torch.manual_seed(3)
    teacher = torch.randn(2, 6, 8, 10)
    raw, unit = _identity_loss(6, normalize=False), _identity_loss(6)
    assert raw(teacher, teacher)["feat"].abs() < 1e-6
    assert unit(2 * teacher, teacher)["feat"].abs() < 1e-6
    torch.testing.assert_close(raw(2 * teacher, teacher)["feat"], teacher.square().mean(), rtol=1e-5, atol=0)
    fg, valid = torch.rand(2, 8, 10), (torch.rand(2, 1, 8, 10) > 0.3).float()
    student = torch.randn(2, 6, 16, 20, requires_grad=True)
    results = []
    for forward in (raw.forward, raw._forward_autograd):
        student.grad = None
        forward(student, teacher, valid, fg)["feat"].backward()
        results.append(student.grad.clone())
    torch.testing.assert_close(*results, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="normalize=False"):
        SpatialDistillLoss(2, 2, loss="cosine", normalize=False)
