"""One optimizer step of contrastive training: embed, NT-Xent over the whole global batch, backward, step.

With `train.grad_accum` = k > 1 the step still has one contrastive batch of k x micro x world pairs, as
the learning rate (scaled for the global batch) assumes: each anchor sees 2 x global_batch - 2 keys, as
if the whole batch had fit at once. This is GradCache (Gao et al. 2021):

  1. embed every micro-batch without a graph (BN running statistics frozen: step 3 counts them);
  2. one NT-Xent over all k micro-batches' embeddings (gathered over ranks as usual); its backward
     gives dL/dz for every embedding, at the cost of embeddings only;
  3. embed each micro-batch again with a graph and backpropagate (z . dL/dz).sum(), whose parameter
     gradient is micro-batch m's exact share of dL/dtheta; DeepSpeed sums the k shares (no 1/k scaling)
     and averages over ranks, which the loss's scaling makes exactly dL/dtheta.

The price is one extra forward per micro-batch (about a third more compute). BatchNorm statistics stay
those of each micro-batch (over all ranks with global BN): that part of the large batch is not recovered.
"""

from __future__ import annotations

import contextlib

import torch

from ..config import RunConfig
from ..data.batch import PairBatch
from ..distributed.batchnorm import set_batch_mask
from ..distributed.gather import gather_nograd
from ..distributed.sync import any_rank
from ..losses.ntxent import NTXentOutput, nt_xent
from ..models.bn_stats import frozen_running_stats
from .collapse import collapse_stats


def autocast_for(cfg: RunConfig, device: torch.device):
    # bf16 is autocast over fp32 weights: LARS and the optimizer states stay exact, matmuls run in bf16.
    if cfg.train.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ContrastiveStep:
    """Calls engine forward/backward/step for one optimizer step's micro-batches; returns (loss, accuracy).

    `engine` is a DeepSpeed engine (or anything with __call__, backward(loss, scale_wrt_gas=...), step()
    and .module) configured with gradient_accumulation_steps equal to the number of micro-batches.
    """

    def __init__(self, engine, cfg: RunConfig, device: torch.device):
        self.engine, self.cfg, self.device = engine, cfg, device
        self._want_stats, self.collapse = False, None

    def _bn_mask(self, batch: PairBatch) -> torch.Tensor | None:
        """Rows of [view1; view2] that count in BN statistics, or None when every rank's batch is full.

        Agreed over ranks: SyncBatchNorm's full-batch kernels and the masked path use different collectives.
        """
        valid = batch.valid.to(self.device)
        if not any_rank(not bool(valid.all()), self.device):
            return None
        return torch.cat([valid, valid])

    def _embed(self, batch: PairBatch, mask: torch.Tensor | None) -> torch.Tensor:
        """(2B, D) embeddings of [view1; view2], in float32 (float64 models keep float64)."""
        x = torch.cat([batch.view1, batch.view2]).to(self.device, non_blocking=True)
        if self.cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.cfg.train.precision == "fp16":
            x = x.half()
        set_batch_mask(self.engine.module, mask)
        with autocast_for(self.cfg, self.device):
            _, embeddings = self.engine(x)
        return embeddings if embeddings.dtype == torch.float64 else embeddings.float()

    def _loss(self, embeddings: list[torch.Tensor], batches: list[PairBatch]) -> NTXentOutput:
        halves = [e.chunk(2) for e in embeddings]
        z1, z2 = torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])
        patient = torch.cat([b.patient.to(self.device) for b in batches])
        valid = torch.cat([b.valid.to(self.device) for b in batches])
        loss = self.cfg.loss
        if self._want_stats:  # the step's own embeddings, so the statistics cost no forward
            self.collapse = collapse_stats(gather_nograd(z1.detach()), gather_nograd(z2.detach()), gather_nograd(valid))
        return nt_xent(z1, z2, loss.temperature, patient=patient, valid=valid,
                       exclude_same_patient=loss.exclude_same_patient, chunk_size=loss.chunk_size)

    def __call__(self, batches: list[PairBatch], stats: bool = False) -> tuple[float, float]:
        """One optimizer step; with `stats`, self.collapse holds the global batch's collapse statistics."""
        self._want_stats, self.collapse = stats, None
        masks = [self._bn_mask(b) for b in batches]
        if len(batches) == 1:
            out = self._loss([self._embed(batches[0], masks[0])], batches)
            self.engine.backward(out.loss)
            self.engine.step()
            return float(out.global_loss), float(out.accuracy)
        with torch.no_grad(), frozen_running_stats(self.engine.module):
            cached = [self._embed(b, m).detach().requires_grad_() for b, m in zip(batches, masks)]
        out = self._loss(cached, batches)
        out.loss.backward()  # to the cached embeddings only: they are leaves
        for batch, mask, leaf in zip(batches, masks, cached):
            surrogate = (self._embed(batch, mask) * leaf.grad).sum()
            self.engine.backward(surrogate, scale_wrt_gas=False)
            self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        return float(out.global_loss), float(out.accuracy)
