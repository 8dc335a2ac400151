"""make_optimizer: the one builder pretraining and fine-tuning share."""

import pytest
import torch

from medssl_scale.optim import LARS, make_optimizer


def _model():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    m(torch.zeros(1, 3, 5, 5))
    return m


def test_groups_weight_decay_and_kinds():
    m = _model()
    conv_w, bn_w, bn_b, fc_w = m[0].weight, m[1].weight, m[1].bias, m[3].weight
    lars = make_optimizer("lars", m, lr=0.1, weight_decay=1e-4, lars_lr_in_velocity=True)
    assert isinstance(lars, LARS)
    decayed, excluded = lars.param_groups
    assert {id(p) for p in decayed["params"]} == {id(conv_w), id(fc_w)} and decayed["weight_decay"] == 1e-4
    assert {id(bn_w), id(bn_b)} <= {id(p) for p in excluded["params"]} and excluded["weight_decay"] == 0.0
    assert excluded["lars_exclude"] and not decayed["lars_exclude"]
    adamw = make_optimizer("adamw", m, lr=1e-3, weight_decay=0.05, betas=(0.8, 0.9))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.8, 0.9)
    assert all("lars_exclude" not in g for g in adamw.param_groups)
    sgd = make_optimizer("sgd", m, lr=0.5, weight_decay=0.0, momentum=0.7)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.7
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("adam", m, lr=1.0, weight_decay=0.0)


def test_frozen_parameters_are_left_out_and_empty_groups_dropped_on_request():
    m = _model()
    for p in m[:2].parameters():  # conv and BN frozen: only the linear layer trains
        p.requires_grad_(False)
    opt = make_optimizer("sgd", m, lr=0.1, weight_decay=1e-4, trainable_only=True)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]  # fc weight (decayed), fc bias
    m2 = _model()
    for p in m2.parameters():
        p.requires_grad_(p.ndim > 1)  # no bias or BN parameter trains: the excluded group would be empty
    assert len(make_optimizer("sgd", m2, lr=0.1, weight_decay=0.0, trainable_only=True).param_groups) == 1
