"""BatchNorm bookkeeping of the trainer's model: one running-statistics update per forward under activation
checkpointing, and SimCLR's zero-initialized residual branches."""

import copy

import torch
from torch import nn

from medssl_scale.config import load_config
from medssl_scale.models import build_backbone
from medssl_scale.models.bn_stats import frozen_running_stats
from medssl_scale.train.builders import build_model


def _bn_state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_activation_checkpointing_updates_running_stats_once_and_keeps_gradients():
    torch.manual_seed(0)
    plain = build_backbone(18, small_input=True).double()
    ckpt = copy.deepcopy(plain)
    ckpt.checkpoint_stages = True
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    for model in (plain, ckpt):
        (model(x) ** 2).sum().backward()
    stats, ref = _bn_state(ckpt), _bn_state(plain)
    assert all(int(v) == 1 for k, v in stats.items() if k.endswith("num_batches_tracked"))
    for k in ref:
        torch.testing.assert_close(stats[k], ref[k], rtol=0, atol=1e-12, msg=k)
    for (k, p), (_, q) in zip(ckpt.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-10, msg=k)


def test_frozen_running_stats_computes_batch_statistics_but_restores_buffers():
    bn = nn.BatchNorm1d(3).double()
    x = torch.randn(5, 3, dtype=torch.float64) * 2 + 1
    with frozen_running_stats(bn):
        y = bn(x)
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + bn.eps)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(bn.running_var, torch.ones(3, dtype=torch.float64))


def test_zero_init_residual_is_on_by_default_and_can_be_turned_off():
    assert load_config(None).model.zero_init_residual is True
    for depth, last in ((18, "bn2"), (50, "bn3")):
        for on in (True, False):
            cfg = load_config("configs/debug_cpu.yaml", [f"model.depth={depth}", f"model.zero_init_residual={str(on).lower()}"])
            backbone = build_model(cfg, "cpu").backbone
            blocks = [m for stage in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4) for m in stage]
            weights = torch.cat([getattr(b, last).weight.detach() for b in blocks])
            assert torch.equal(weights, torch.zeros_like(weights) if on else torch.ones_like(weights)), (depth, on)
            assert torch.equal(backbone.bn1.weight.detach(), torch.ones_like(backbone.bn1.weight))  # stem untouched
