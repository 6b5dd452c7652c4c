"""Splitting a traced model at a node: the two halves compose to the model, only cut vertices are allowed."""

import pytest
import torch

import models
from prune_cli.errors import PruneCliError
from prune_cli.surgery.split import attach_candidates, cut_nodes, gap_features, node_index, split, trace


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small layers: one thread avoids OpenMP spinning on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["vgg11", "resnet20", "resnet50"])
def test_halves_compose_to_the_model_at_every_candidate(name):
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=7, in_channels=1).eval()
    gm = trace(model)
    x = torch.randn(3, 1, 16, 16)
    candidates = attach_candidates(gm, x[:1])
    assert len(candidates) >= 3
    with torch.no_grad():
        expected = model(x)
        for c in candidates:
            extractor, tail = split(gm, c.node)
            h = extractor(x)
            assert h.shape[1] == c.channels and tuple(h.shape[2:]) == c.hw
            assert torch.allclose(tail(h), expected, atol=1e-5)
    # The tail holds only its own layers, under the model's names.
    own = dict(model.state_dict())
    for key, value in tail.state_dict().items():
        assert torch.equal(own[key], value)
    assert len(tail.state_dict()) < len(own)


def test_resnet_candidates_are_block_outputs_only():
    gm = trace(models.create_model("resnet20", num_classes=10, in_channels=1))
    cands = attach_candidates(gm, torch.zeros(1, 1, 16, 16))
    # Stem + 9 blocks: inside a block the shortcut still reads the block input, so no cut there.
    assert len(cands) == 10
    assert all("(" in c.label for c in cands[1:])  # function nodes carry their block's path
    inner = [n.name for n in gm.graph.nodes if n.name == "relu_1"]
    assert inner and "relu_1" not in cut_nodes(gm)
    with pytest.raises(PruneCliError, match="does not cut"):
        split(gm, "relu_1")
    with pytest.raises(PruneCliError, match="no node"):
        split(gm, "nowhere")


def test_vgg_skips_a_relu_read_only_by_a_pool():
    gm = trace(models.create_model("vgg11", num_classes=10, in_channels=1))
    labels = [c.label for c in attach_candidates(gm, torch.zeros(1, 1, 32, 32))]
    assert labels[0] == "features.3"  # the pool after the first ReLU (features.2)
    assert "features.2" not in labels


def test_gap_features_and_node_index():
    torch.manual_seed(0)
    model = models.create_model("vgg11", num_classes=10, in_channels=1).eval()
    gm = trace(model)
    x = torch.randn(5, 1, 16, 16)
    c = attach_candidates(gm, x[:1])[1]
    feats = gap_features(gm, [c.node], x, batch_size=2)[c.node]
    with torch.no_grad():
        assert torch.allclose(feats, split(gm, c.node)[0](x).mean((2, 3)), atol=1e-6)
    where = node_index(gm)
    assert where["features.0"] < where["features.4"] < where["classifier.4"]
