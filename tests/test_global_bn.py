"""Global BatchNorm over real gloo process groups equals plain BatchNorm on the concatenated batch."""

import copy
import multiprocessing
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from medssl_scale.distributed.batchnorm import (GlobalBatchNorm1d, GlobalBatchNorm2d, convert_to_global_bn,
                                                make_global_bn)

TOL = dict(rtol=0, atol=1e-9)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    # A large common offset: statistics computed as E[x^2] - E[x]^2 would lose digits here.
    x = torch.randn(n, 3, 4, 5, generator=g, dtype=torch.float64) * 2 + 30
    target = torch.randn(n, 3, 4, 5, generator=g, dtype=torch.float64)
    return x, target


def _bn_pair(seed: int, momentum):
    ref = nn.BatchNorm2d(3, momentum=momentum).double()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        ref.weight.copy_(torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
        ref.bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
        ref.running_var.fill_(2.0)
    ours = nn.BatchNorm2d(3, momentum=momentum).double()
    ours.load_state_dict(ref.state_dict())
    return ref, convert_to_global_bn(ours)


def _check_steps(rank: int, sizes: list[int], momentum, ddp_mean_loss: bool) -> None:
    """Two training steps then one eval step, against nn.BatchNorm2d on the whole batch.

    ddp_mean_loss: each rank's loss is the mean over its own samples (what DDP training does) and weight
    gradients are averaged over ranks; the single-process loss is the mean over all samples. Then the
    averaged weight gradients equal the single-process ones, and each input gradient is world_size times
    the single-process one (every rank's backward carries the sum of all ranks' losses, which DDP's
    1/world average removes again downstream). Otherwise losses are sums: input gradients equal exactly,
    weight gradients summed over ranks equal the single-process ones.
    """
    world = len(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    ref, ours = _bn_pair(7, momentum)
    assert isinstance(ours, GlobalBatchNorm2d)
    for step in range(2):
        x, target = _data(100 + step, sum(sizes))
        xr = x.clone().requires_grad_()
        xl = x[lo:hi].clone().requires_grad_()
        ref.zero_grad(), ours.zero_grad()
        y_ref, y = ref(xr), ours(xl)
        torch.testing.assert_close(y, y_ref[lo:hi], **TOL)
        loss_ref, loss = (y_ref * target).sum(), (y * target[lo:hi]).sum()
        if ddp_mean_loss:
            loss_ref, loss = loss_ref / sum(sizes), loss / sizes[rank]
        loss_ref.backward(), loss.backward()
        scale = world if ddp_mean_loss else 1
        torch.testing.assert_close(xl.grad, scale * xr.grad[lo:hi], **TOL)
        for p, p_ref in ((ours.weight, ref.weight), (ours.bias, ref.bias)):
            g = p.grad.clone()
            dist.all_reduce(g)
            torch.testing.assert_close(g / world if ddp_mean_loss else g, p_ref.grad, **TOL)
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), **TOL)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
    ref.eval(), ours.eval()
    x, _ = _data(200, sum(sizes))
    with torch.no_grad():
        torch.testing.assert_close(ours(x[lo:hi]), ref(x)[lo:hi], **TOL)


def _check_converted_model(rank: int, world: int) -> None:
    """A conv net with BN2d and BN1d, converted: outputs and input gradients match the unconverted net."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
                        nn.BatchNorm1d(5)).double()
    ours = convert_to_global_bn(copy.deepcopy(ref))
    assert isinstance(ours[1], GlobalBatchNorm2d) and isinstance(ours[5], GlobalBatchNorm1d)
    n = 3
    x = torch.randn(n * world, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    xr, xl = x.clone().requires_grad_(), x[rank * n:(rank + 1) * n].clone().requires_grad_()
    y_ref, y = ref(xr), ours(xl)
    torch.testing.assert_close(y, y_ref[rank * n:(rank + 1) * n], **TOL)
    (y_ref ** 2).sum().backward()
    (y ** 2).sum().backward()
    torch.testing.assert_close(xl.grad, xr.grad[rank * n:(rank + 1) * n], **TOL)
    g = ours[0].weight.grad.clone()
    dist.all_reduce(g)
    torch.testing.assert_close(g, ref[0].weight.grad, **TOL)


def _worker(rank: int, world: int, port: int, uneven: list[int]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # several ranks share two cores
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        _check_steps(rank, [4] * world, momentum=0.1, ddp_mean_loss=True)
        _check_steps(rank, uneven, momentum=None, ddp_mean_loss=False)  # None: cumulative average
        _check_converted_model(rank, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,uneven", [(2, [3, 5]), (3, [2, 6, 1])])
def test_global_bn_equals_single_process_bn(world, uneven):
    # forkserver imports torch once for all ranks of both groups (spawn would import it per rank) and,
    # unlike fork, never copies this process's OpenMP threads into a child.
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", __name__])
    mp.start_processes(_worker, args=(world, _free_port(), uneven), nprocs=world, join=True,
                       start_method="forkserver")


def test_without_process_group_it_is_plain_batchnorm():
    torch.manual_seed(1)
    ref = nn.BatchNorm2d(3).double()
    ours = GlobalBatchNorm2d(3).double()
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=0, atol=0)


def test_convert_keeps_tensors_and_mode_and_make_global_bn_dispatches():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.3, eps=1e-3), nn.Sequential(nn.BatchNorm2d(2)))
    with torch.no_grad():
        model[1].weight.fill_(2.0), model[1].running_mean.fill_(0.5)
    model[2][0].eval()
    w, rm = model[1].weight, model[1].running_mean
    out = convert_to_global_bn(model)
    assert isinstance(out[1], GlobalBatchNorm1d) and isinstance(out[2][0], GlobalBatchNorm2d)
    assert out[1].weight is w and out[1].running_mean is rm  # the same tensors, not copies
    assert out[1].momentum == 0.3 and out[1].eps == 1e-3 and not out[2][0].training and out[1].training
    assert convert_to_global_bn(out)[1] is out[1]  # idempotent
    single = convert_to_global_bn(nn.BatchNorm2d(5))
    assert isinstance(single, GlobalBatchNorm2d)
    cpu = make_global_bn(nn.Sequential(nn.BatchNorm2d(2)), "cpu")
    assert isinstance(cpu[0], GlobalBatchNorm2d)
    cuda = make_global_bn(nn.Sequential(nn.BatchNorm2d(2)), "cuda")  # conversion alone needs no GPU
    assert isinstance(cuda[0], nn.SyncBatchNorm)
