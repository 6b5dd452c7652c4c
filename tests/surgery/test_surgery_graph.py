"""Channel groups from the traced graph: couplings, flags, and clear errors on what cannot be reasoned about."""

import pytest
import torch
from helpers import concat_net
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import models
from prune_cli.errors import UnsupportedGraph
from prune_cli.surgery import channel_groups


def by_id(groups):
    return {g.id: g for g in groups}


def test_vgg_groups_are_conv_bn_next_conv(tiny_vgg, example_input):
    groups = by_id(channel_groups(tiny_vgg, example_input))
    g = groups["features.0"]
    assert g.prunable and not g.residual and g.size == 64
    assert {(m.module, m.kind) for m in g.members} == {
        ("features.0", "conv_out"), ("features.1", "bn"), ("features.4", "conv_in")
    }  # fmt: skip
    assert not groups["input"].prunable and not groups["classifier.4"].prunable  # image and logits
    assert groups["classifier.1"].prunable  # the 512-wide hidden layer: Linear out + BN1d + Linear in


def test_resnet_residual_group_spans_every_branch(tiny_resnet, example_input):
    groups = by_id(channel_groups(tiny_resnet, example_input))
    stage1 = groups["conv1"]
    assert stage1.residual and stage1.size == 16
    producers = {m.module for m in stage1.producers}
    assert producers == {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}
    # the projection shortcut of stage 2 joins stage 2's residual group, and reads stage 1's
    assert "layer2.0.shortcut.0" in {m.module for m in groups["layer2.0.conv2"].producers}
    assert ("layer2.0.shortcut.0", "conv_in") in {(m.module, m.kind) for m in stage1.members}
    assert not groups["layer1.0.conv1"].residual


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16_bn", "mobilenet_v2", "efficientnet_b0"])
def test_torchvision_models(name):
    model = models.create_model(f"torchvision:{name}", num_classes=10).eval()
    groups = channel_groups(model, torch.randn(1, 3, 32, 32))
    assert sum(g.prunable for g in groups) >= 10
    assert not by_id(groups)["input"].prunable
    if name == "mobilenet_v2":  # depthwise convs couple their in and out channels
        kinds = {m.kind for g in groups for m in g.members}
        assert "depthwise" in kinds


def test_concat_offsets_and_flatten_expansion():
    model = concat_net().eval()
    groups = by_id(channel_groups(model, torch.randn(1, 3, 16, 16)))
    a, b = groups["a"], groups["b"]
    assert ("mix", "conv_in", 0) in {(m.module, m.kind, m.offset) for m in a.members}
    assert ("mix", "conv_in", 6) in {(m.module, m.kind, m.offset) for m in b.members}
    fc_in = [m for m in groups["mix"].members if m.kind == "linear_in"]
    assert fc_in and fc_in[0].expand == 64  # 8x8 spatial positions per channel after flatten


class ConvThen(nn.Module):
    """A conv, then `tail`: the operation under test."""

    def __init__(self, tail):
        super().__init__()
        self.conv, self.tail = nn.Conv2d(3, 4, 3), tail

    def forward(self, x):
        return self.tail(self.conv(x))


def test_unknown_op_names_the_op_and_the_line_that_called_it():
    odd = ConvThen(lambda y: torch.fft.fft2(y).real.sum((2, 3)))
    with pytest.raises(UnsupportedGraph, match=r"torch\.fft\.fft2, called at .*test_surgery_graph\.py:\d+ in <lambda>"):
        channel_groups(odd, torch.randn(1, 3, 8, 8))


def test_writing_into_channels_is_a_clear_error():
    """y[:, :2] = 0 names channels by position: after a removal they would be other channels."""

    def zero_two_channels(y):
        y[:, :2] = 0
        return y

    with pytest.raises(UnsupportedGraph, match=r"torch\.Tensor\.__setitem__, called at .* in zero_two_channels"):
        channel_groups(ConvThen(zero_two_channels), torch.randn(1, 3, 8, 8))


def test_a_forward_that_branches_on_values_is_a_clear_error():
    """The channels such a forward reaches may change with the input, and the analysis computes no real values."""

    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UnsupportedGraph, match=r"reads values .*Tensor.__bool__, called at .*test_surgery_graph.py"):
        channel_groups(DataDependent(), torch.randn(1, 3, 4, 4))


def test_branches_on_shapes_are_followed():
    """Python control flow on shapes (which fx cannot trace) is fine: the pass runs the model."""

    class ShapeDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y) if y.shape[-1] > 2 else y

    groups = by_id(channel_groups(ShapeDependent(), torch.randn(1, 3, 4, 4)))
    assert groups["a"].prunable and not groups["b"].prunable
    assert {(m.module, m.kind) for m in groups["a"].members} == {("a", "conv_out"), ("b", "conv_in")}


def test_analysis_leaves_the_model_as_it_was(tiny_resnet, example_input):
    """Eval mode and no autograd during the pass only: training flags (even mixed ones) and BatchNorm statistics are
    restored or untouched."""
    tiny_resnet.train()
    tiny_resnet.bn1.eval()
    before = {k: v.clone() for k, v in tiny_resnet.state_dict().items()}
    channel_groups(tiny_resnet, example_input)
    assert tiny_resnet.training and not tiny_resnet.bn1.training and tiny_resnet.layer1[0].bn1.training
    assert all(torch.equal(v, before[k]) for k, v in tiny_resnet.state_dict().items())


def test_a_failing_forward_is_one_clear_error():
    with pytest.raises(UnsupportedGraph, match=r"Sequential fails on an input of shape \(1, 2, 8, 8\)"):
        channel_groups(nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randn(1, 2, 8, 8))


def test_groups_are_deterministic(tiny_resnet, example_input):
    assert channel_groups(tiny_resnet, example_input) == channel_groups(tiny_resnet, example_input)


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # the reference call's, about its own speed
@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(5, 20),
    kernel=st.integers(1, 5),
    stride=st.integers(1, 3),
    padding=st.one_of(st.integers(0, 3), st.sampled_from(["same", "valid"])),
    dilation=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
)
def test_convolutions_are_not_computed_but_their_shapes_are_right(size, kernel, stride, padding, dilation, groups):
    """The pass hands back zeros of a conv's output shape: that shape must be the one F.conv2d gives."""
    from prune_cli.surgery.graph import _conv_zeros

    if padding == "same" and stride > 1:
        return  # not allowed by PyTorch either
    x, w = torch.randn(1, 4, size, size + 1), torch.randn(6, 4 // groups, kernel, kernel)
    args = (x, w, None, stride, padding, dilation, groups)
    try:
        want = torch.nn.functional.conv2d(*args).shape
    except RuntimeError:  # the kernel does not fit: the pass leaves it to the real call, which says so
        assert _conv_zeros(args, {}) is None
        return
    assert _conv_zeros(args, {}).shape == want
    assert (
        _conv_zeros((x, w), {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}).shape
        == want
    )
