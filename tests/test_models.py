"""ResNet trunk (torchvision equivalence, SimCLR widths), projection head and the contrastive model."""

import pytest
import torch
import torchvision
from torch import nn

from medssl_scale.models import ContrastiveModel, ProjectionHead, ResNet, build_backbone

STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def _randomize(model: nn.Module, seed: int) -> None:
    """Non-trivial BN affine params and running stats, so eval-mode outputs depend on every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype) + 0.5)


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_width1_matches_torchvision_exactly(depth):
    torch.manual_seed(depth)
    ref = getattr(torchvision.models, f"resnet{depth}")().double()
    _randomize(ref, depth)
    ref.fc = nn.Identity()  # torchvision's forward then returns the pooled, flattened features
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    with torch.device("meta"):  # skip our own init: every tensor comes from torchvision's model
        ours = build_backbone(depth, 1)
    ours.load_state_dict(sd, strict=True, assign=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for train in (False, True):
        ref.train(train), ours.train(train)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_width1_state_dict_is_torchvisions_without_fc(depth):
    # 101/152 differ from 50 only in block counts, which names and shapes pin down; no forward needed.
    with torch.device("meta"):
        ref = getattr(torchvision.models, f"resnet{depth}")()
        ours = build_backbone(depth, 1)
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == ref_shapes
    assert ours.feature_dim == ref.fc.in_features


def _expected_params(depth: int, w: int, small_input: bool = False) -> int:
    """Parameter count written out from the architecture (conv weights + BN gamma/beta), no fc."""
    bottleneck = depth >= 50
    exp = 4 if bottleneck else 1
    n = 3 * (3 * 3 if small_input else 7 * 7) * 64 * w + 2 * 64 * w
    cin = 64 * w
    for stage, blocks in enumerate(STAGES[depth]):
        planes = 64 * w * 2 ** stage
        for b in range(blocks):
            if bottleneck:
                n += cin * planes + 2 * planes + 9 * planes * planes + 2 * planes + planes * 4 * planes + 2 * 4 * planes
            else:
                n += 9 * cin * planes + 2 * planes + 9 * planes * planes + 2 * planes
            if b == 0 and (stage > 0 or cin != planes * exp):
                n += cin * planes * exp + 2 * planes * exp
            cin = planes * exp
    return n


@pytest.mark.parametrize("depth,width", [(d, w) for d in STAGES for w in (1, 2, 4)])
def test_width_multiplier_scales_every_channel(depth, width):
    with torch.device("meta"):  # ResNet-152 x4 is ~0.9 G parameters: shapes only, no memory
        m = build_backbone(depth, width)
    exp = 4 if depth >= 50 else 1
    assert m.feature_dim == 512 * width * exp
    sd = m.state_dict()
    assert sd["conv1.weight"].shape == (64 * width, 3, 7, 7)
    last = f"layer4.{STAGES[depth][3] - 1}"
    if exp == 4:
        assert sd[f"{last}.conv2.weight"].shape == (512 * width, 512 * width, 3, 3)
        assert sd[f"{last}.conv3.weight"].shape == (2048 * width, 512 * width, 1, 1)
        assert sd["layer1.0.downsample.0.weight"].shape == (256 * width, 64 * width, 1, 1)
    else:
        assert sd[f"{last}.conv2.weight"].shape == (512 * width, 512 * width, 3, 3)
        assert "layer1.0.downsample.0.weight" not in sd
    assert sum(p.numel() for p in m.parameters()) == _expected_params(depth, width)


def test_known_parameter_counts():
    # torchvision resnet50 has 25,557,032 parameters, of which fc holds 2048*1000 + 1000;
    # SimCLR's Table (R50 2x: 94M, 4x: 375M) rounds the same counts.
    with torch.device("meta"):
        counts = {w: sum(p.numel() for p in build_backbone(50, w).parameters()) for w in (1, 2, 4)}
    assert counts[1] == 25_557_032 - 2_049_000
    assert round(counts[2] / 1e6) == 94 and round(counts[4] / 1e6) == 375


def test_width2_forward_and_small_input():
    torch.manual_seed(0)
    m = build_backbone(18, 2, small_input=True).eval()
    assert isinstance(m.maxpool, nn.Identity) and m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert sum(p.numel() for p in m.parameters()) == _expected_params(18, 2, small_input=True)
    with torch.no_grad():
        assert m(torch.randn(2, 3, 16, 16)).shape == (2, 1024)
        # The small stem keeps full resolution into layer1; layer3 has stride 4 (16 px -> 4 px).
        x = m.maxpool(m.relu(m.bn1(m.conv1(torch.randn(1, 3, 16, 16)))))
        assert x.shape[-1] == 16 and m.layer3(m.layer2(m.layer1(x))).shape[-1] == 4


def test_zero_init_residual_makes_blocks_identity():
    m = build_backbone(50, 1, zero_init_residual=True)
    assert all(float(b.bn3.weight.detach().abs().sum()) == 0 for layer in (m.layer1, m.layer4) for b in layer)
    b = m.layer2[1].eval()  # a block without downsample: output = relu(0 + x) = x for x >= 0
    x = torch.rand(2, 512, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(b(x), x, rtol=0, atol=0)
    basic = build_backbone(18, 1, zero_init_residual=True)
    assert float(basic.layer3[1].bn2.weight.detach().abs().sum()) == 0
    assert float(build_backbone(18, 1).layer3[1].bn2.weight.detach().sum()) == 256


def test_channels_last_matches_contiguous():
    torch.manual_seed(1)
    ref = build_backbone(18, 1, small_input=True).eval()
    cl = build_backbone(18, 1, channels_last=True, small_input=True).eval()
    cl.load_state_dict(ref.state_dict())
    assert cl.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(cl(x.to(memory_format=torch.channels_last)), ref(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(cl(x), ref(x), rtol=0, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth must be one of"):
        build_backbone(49, 1)
    with pytest.raises(ValueError, match="width multiplier"):
        build_backbone(50, 0)
    with pytest.raises(ValueError, match="layers must be a positive integer"):
        ProjectionHead(8, layers=0)


def test_projection_head_layout_and_values():
    torch.manual_seed(2)
    head = ProjectionHead(6, hidden_dim=5, out_dim=3, layers=3).double()
    kinds = [type(m).__name__ for m in head.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert all(m.bias is None for m in head.net if isinstance(m, nn.Linear))
    last_bn = head.net[-1]
    assert not last_bn.bias.requires_grad and float(last_bn.bias.abs().sum()) == 0
    with torch.no_grad():
        for m in head.net:
            if isinstance(m, nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                if m.bias.requires_grad:
                    m.bias.normal_()
    x = torch.randn(7, 6, dtype=torch.float64)

    def bn(h, m):  # training-mode BN written out: biased batch variance
        mu, var = h.mean(0), h.var(0, unbiased=False)
        return (h - mu) / torch.sqrt(var + m.eps) * m.weight + m.bias

    lin = [m for m in head.net if isinstance(m, nn.Linear)]
    bns = [m for m in head.net if isinstance(m, nn.BatchNorm1d)]
    h = x
    for i in range(3):
        h = bn(h @ lin[i].weight.T, bns[i])
        if i < 2:
            h = torch.relu(h)
    torch.testing.assert_close(head(x), h, rtol=0, atol=1e-12)

    plain = ProjectionHead(6, 5, 3, layers=2, bn=False)
    assert [type(m).__name__ for m in plain.net] == ["Linear", "ReLU", "Linear"]
    assert plain.net[0].bias is not None and plain.net[2].bias is None


def test_contrastive_model_outputs_and_encoder_state_dict():
    torch.manual_seed(3)
    backbone = build_backbone(18, 1, small_input=True, channels_last=True)
    model = ContrastiveModel(backbone, ProjectionHead(backbone.feature_dim, 64, 16)).to(torch.bfloat16)
    x = torch.randn(4, 3, 16, 16, dtype=torch.bfloat16)
    feats, emb = model(x)
    assert feats.shape == (4, 512) and emb.shape == (4, 16)
    with torch.no_grad():
        torch.testing.assert_close(emb, model.head(feats))
    sd = model.encoder_state_dict()
    assert set(sd) == set(backbone.state_dict())
    assert all(v.dtype == torch.float32 for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    assert sd["bn1.num_batches_tracked"].dtype == torch.int64
    assert all(v.is_contiguous() and v.device.type == "cpu" for v in sd.values())
    torch.testing.assert_close(sd["conv1.weight"], backbone.conv1.weight.detach().float(), rtol=0, atol=0)
    sd["conv1.weight"].zero_()  # a copy: editing it leaves the model alone
    assert float(backbone.conv1.weight.detach().abs().sum()) > 0
    fresh = build_backbone(18, 1, small_input=True)
    fresh.load_state_dict(sd, strict=True)
    assert isinstance(fresh, ResNet)


def test_activation_checkpointing_gives_the_same_gradients():
    import copy

    torch.manual_seed(0)
    plain = build_backbone(18).double()
    recomputed = copy.deepcopy(plain)
    recomputed.checkpoint_stages = True
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    for model in (plain, recomputed):
        model(x).pow(2).sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-12), name
