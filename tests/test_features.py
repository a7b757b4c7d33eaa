"""Pooling of every output shape, and hooks on nested / list-output modules."""

import pytest
import torch
from torch import nn

from bevcache.errors import ConfigError, LayerError
from bevcache.features import LayerRecorder, _tensor_leaves, pool_output, resolve_module


@pytest.mark.parametrize("shape, dims", [((2, 8, 5, 7), (2, 3)), ((2, 8, 3, 5, 7), (2, 3, 4))])
def test_dense_maps_pool_over_space(shape, dims):
    x = torch.randn(shape)
    assert torch.allclose(pool_output(x, "avg"), x.mean(dim=dims))
    assert torch.equal(pool_output(x, "max"), x.amax(dim=dims))
    both = pool_output(x, "avgmax")
    assert both.shape == (2, 16)
    assert torch.allclose(both[:, :8], x.mean(dim=dims)) and torch.equal(both[:, 8:], x.amax(dim=dims))


def test_point_features_pool_over_points():
    x = torch.randn(3, 100, 6)  # [B, N, C]
    assert torch.allclose(pool_output(x, "avg"), x.mean(dim=1))
    assert pool_output(x, "max").shape == (3, 6)


def test_vector_passes_through():
    x = torch.randn(4, 5)
    assert torch.equal(pool_output(x, "avg"), x)
    assert pool_output(x, "avgmax").shape == (4, 10)


def test_nested_outputs_concatenate_in_stable_order():
    a, b, c = torch.randn(2, 4, 6, 6), torch.randn(2, 3, 2, 2), torch.randn(2, 5)
    out = pool_output({"z": [a], "a": (b, None, {"k": c})}, "avg")
    expected = torch.cat([b.mean(dim=(2, 3)), c, a.mean(dim=(2, 3))], dim=1)  # keys sorted: 'a' then 'z'
    assert torch.allclose(out, expected)


def test_leaves_without_the_batch_dimension_are_skipped():
    x, other = torch.randn(2, 4, 3, 3), torch.randn(7, 4, 3, 3)
    assert pool_output([x, other], "avg", batch_size=2).shape == (2, 4)


def test_bad_inputs_are_clear():
    with pytest.raises(ConfigError, match="pooling must be one of"):
        pool_output(torch.randn(2, 3), "mean")
    with pytest.raises(LayerError, match="no floating tensor"):
        pool_output([None, 3], "avg")
    with pytest.raises(LayerError, match="cannot pool"):
        pool_output(torch.randn(1, 2, 3, 4, 5, 6), "avg")


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return [y, y[:, :2, ::2, ::2]]  # multi-scale list output, like SECONDFPN


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pts_backbone = nn.Sequential(Inner())
        self.head = nn.Linear(4, 2)
        self.unused = nn.Linear(1, 1)

    def forward(self, x):
        feats = self.pts_backbone(x)
        return self.head(feats[0].mean(dim=(2, 3)))


def test_hooks_on_nested_and_list_output_modules():
    net = Net()
    x = torch.randn(2, 3, 8, 8)
    with LayerRecorder(net, ["pts_backbone.0", "pts_backbone.0.conv", "head"]) as rec:
        rec.run(net, x)
        pooled = rec.pooled("avg", batch_size=2)
    y = net.pts_backbone[0].conv(x)
    assert torch.allclose(pooled["pts_backbone.0.conv"], y.mean(dim=(2, 3)), atol=1e-6)
    assert pooled["pts_backbone.0"].shape == (2, 4 + 2)
    assert pooled["head"].shape == (2, 2)
    assert not net.pts_backbone[0].conv._forward_hooks  # removed on exit


def test_student_features_keep_their_graph():
    net = Net()
    with LayerRecorder(net, ["pts_backbone"]) as rec:
        rec.run(net, torch.randn(2, 3, 8, 8))
        rec.pooled("avg", 2)["pts_backbone"].sum().backward()
    assert net.pts_backbone[0].conv.weight.grad is not None


def test_stop_early_skips_the_rest_of_the_forward():
    net = Net()
    calls = []
    net.head.register_forward_hook(lambda *a: calls.append(1))
    with LayerRecorder(net, ["pts_backbone"], stop_early=True) as rec:
        assert rec.run(net, torch.randn(1, 3, 8, 8)) is None
        assert rec.pooled("max", 1)["pts_backbone"].shape == (1, 6)
    assert calls == []


def test_unknown_layer_lists_modules_and_close_matches():
    with pytest.raises(LayerError) as err:
        resolve_module(Net(), "pts_backbon")
    msg = str(err.value)
    assert "pts_backbone" in msg and "Top-level modules" in msg and "head" in msg


def test_layer_that_never_runs_is_reported():
    net = Net()
    with LayerRecorder(net, ["unused"]) as rec:
        rec.run(net, torch.randn(1, 3, 8, 8))
        with pytest.raises(LayerError, match="produced no output"):
            rec.pooled("avg", 1)


# Property: any nesting of 2-5-d tensors pools to [B, sum of channel widths], in a stable order.
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _channels(t: torch.Tensor) -> int:
    return t.shape[-1] if t.dim() == 3 else t.shape[1]


@st.composite
def _outputs(draw, batch: int):
    dims = draw(st.integers(2, 5))
    shape = [batch] + [draw(st.integers(1, 4)) for _ in range(dims - 1)]
    leaf = st.just(torch.randn(shape))
    return draw(st.recursive(leaf, lambda kids: st.lists(kids, min_size=1, max_size=3)
                             | st.dictionaries(st.text("abc", min_size=1, max_size=2), kids, min_size=1, max_size=3),
                             max_leaves=5))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), batch=st.integers(1, 3), pooling=st.sampled_from(["avg", "max", "avgmax"]))
def test_pooling_property(data, batch, pooling):
    output = data.draw(_outputs(batch))
    leaves = list(_tensor_leaves(output))
    pooled = pool_output(output, pooling, batch_size=batch)
    width = sum(_channels(t) for t in leaves) * (2 if pooling == "avgmax" else 1)
    assert pooled.shape == (batch, width)
    assert torch.equal(pooled, pool_output(output, pooling, batch_size=batch))  # deterministic
    if pooling == "max":
        assert all(pooled.max() >= t.max() for t in leaves)  # every leaf's maximum is in the vector
