"""LARS against an independent float64 reference loop; exclusion groups; zero-norm edge cases."""

import math

import pytest
import torch
from torch import nn

from medssl_scale.distributed.batchnorm import convert_to_global_bn
from medssl_scale.optim import LARS, lars_param_groups

WD, ETA, MOM = 1e-2, 1e-3, 0.9


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 4), nn.ReLU(), nn.Linear(4, 2, bias=False)).double()


def _reference(tensors: dict, grads_per_step: list[dict], lrs: list[float], excluded: set, lr_in_velocity: bool):
    """SimCLR's rule written out element by element with Python floats (math.sqrt norms)."""
    w = {k: v.flatten().tolist() for k, v in tensors.items()}
    v = {k: [0.0] * len(x) for k, x in w.items()}
    for grads, lr in zip(grads_per_step, lrs):
        for k in w:
            g = grads[k].flatten().tolist()
            if k not in excluded:
                g = [gi + WD * wi for gi, wi in zip(g, w[k])]
                wn, gn = math.sqrt(sum(x * x for x in w[k])), math.sqrt(sum(x * x for x in g))
                if wn > 0 and gn > 0:
                    g = [ETA * wn / gn * gi for gi in g]
            if lr_in_velocity:
                v[k] = [MOM * vi + lr * gi for vi, gi in zip(v[k], g)]
                w[k] = [wi - vi for wi, vi in zip(w[k], v[k])]
            else:
                v[k] = [MOM * vi + gi for vi, gi in zip(v[k], g)]
                w[k] = [wi - lr * vi for wi, vi in zip(w[k], v[k])]
    return {k: torch.tensor(x, dtype=torch.float64).view(tensors[k].shape) for k, x in w.items()}


def test_param_groups_exclude_batchnorm_and_biases():
    model = _model()
    frozen = nn.Linear(2, 2)
    frozen.weight.requires_grad_(False)
    model.append(frozen)
    model.append(model[6])  # a shared module: its weight must appear once
    decay, excl = lars_param_groups(model, 0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["0.weight", "4.weight", "6.weight"]
    assert sorted(names[id(p)] for p in excl["params"]) == ["1.bias", "1.weight", "4.bias", "7.bias"]
    assert decay["weight_decay"] == 0.5 and not decay["lars_exclude"]
    assert excl["weight_decay"] == 0.0 and excl["lars_exclude"]
    # BatchNorm replaced by the global one is still recognized.
    _, excl = lars_param_groups(convert_to_global_bn(_model()), 0.5)
    assert len(excl["params"]) == 3


@pytest.mark.parametrize("lr_in_velocity", [False, True])
def test_five_steps_match_reference(lr_in_velocity):
    model = _model()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5), model[1].bias.normal_()  # BN params not at their 1/0 init
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    excluded = {"1.weight", "1.bias", "4.bias"}
    lrs = [0.5, 1.0, 2.0, 1.5, 0.25]  # a changing lr separates the two momentum conventions
    opt = LARS(lars_param_groups(model, WD), lr=lrs[0], momentum=MOM, eta=ETA, lr_in_velocity=lr_in_velocity)
    torch.manual_seed(1)
    grads = []
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
        (model(x) ** 2).sum().backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
    expected = _reference(start, grads, lrs, excluded, lr_in_velocity)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=0, atol=1e-12, msg=n)
        assert not torch.equal(p.detach(), start[n])


def test_excluded_params_are_plain_momentum_sgd():
    p = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = LARS([{"params": [p], "lars_exclude": True, "weight_decay": 0.5}], lr=0.1, momentum=0.9)
    p.grad = torch.tensor([0.5, 1.0], dtype=torch.float64)
    opt.step()  # v = g; w = w - 0.1 g  (no decay even though the group asks for it, no trust ratio)
    torch.testing.assert_close(p.detach(), torch.tensor([0.95, -2.1], dtype=torch.float64), rtol=0, atol=1e-15)
    opt.step()  # v = 0.9 g + g = 1.9 g
    torch.testing.assert_close(p.detach(), torch.tensor([0.855, -2.29], dtype=torch.float64), rtol=0, atol=1e-15)


def test_trust_ratio_by_hand():
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))  # ||w|| = 5
    opt = LARS([p], lr=2.0, momentum=0.9, weight_decay=0.0, eta=0.1)
    p.grad = torch.tensor([0.0, 10.0], dtype=torch.float64)  # ||g|| = 10: trust = 0.1 * 5 / 10 = 0.05
    opt.step()  # update = lr * 0.05 * g = (0, 1)
    torch.testing.assert_close(p.detach(), torch.tensor([3.0, 3.0], dtype=torch.float64), rtol=0, atol=1e-15)


def test_zero_norm_edge_cases():
    # ||w|| = 0: trust ratio 1 (a zero-initialized layer still learns, at the plain lr).
    w0 = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    # ||g|| = 0 after weight decay (w = 0 and g = 0): trust ratio 1 and no movement, no NaN.
    both0 = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    # g = 0 but w != 0: weight decay alone sets the direction, scaled by eta * ||w|| / ||wd w|| = eta / wd.
    g0 = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARS([w0, both0, g0], lr=1.0, momentum=0.9, weight_decay=0.5, eta=0.01)
    w0.grad = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    both0.grad = torch.zeros(2, dtype=torch.float64)
    g0.grad = torch.zeros(2, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w0.detach(), torch.tensor([-1.0, 2.0, -0.5], dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(both0.detach(), torch.zeros(2, dtype=torch.float64), rtol=0, atol=0)
    # g = 0.5 * (3, 4) = (1.5, 2); trust = 0.01 * 5 / 2.5 = 0.02; w - (0.03, 0.04)
    torch.testing.assert_close(g0.detach(), torch.tensor([2.97, 3.96], dtype=torch.float64), rtol=0, atol=1e-15)


def test_float32_stays_float32_and_params_without_grad_are_skipped():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = LARS([a, b], lr=0.1, weight_decay=1e-4)
    a.grad = torch.ones(2)
    opt.step()
    assert a.dtype == torch.float32 and opt.state[a]["momentum_buffer"].dtype == torch.float32
    assert torch.equal(b.detach(), torch.ones(2)) and b not in opt.state


@pytest.mark.parametrize("kwargs,match", [(dict(lr=-1.0), "lr must be"), (dict(lr=0.1, momentum=1.0), "momentum"),
                                          (dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
                                          (dict(lr=0.1, eta=0.0), "eta")])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LARS([nn.Parameter(torch.ones(1))], **kwargs)
