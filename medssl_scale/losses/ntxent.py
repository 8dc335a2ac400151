"""NT-Xent, the SimCLR/MICLe contrastive loss: local queries against all ranks' keys, in bounded memory."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F

from medssl_scale.distributed.gather import all_reduce_sum, gather_nograd, gather_with_grad, rank, world_size

__all__ = ["NTXentOutput", "nt_xent"]

# Chunking when chunk_size is None: (logit elements per chunk, fewest query rows per chunk) by device.
# CPU (tuned with bench/loss.py on 2 cores): chunks of 2**24 logits (2048 x 8192) keep the number of
# parallel regions low, which matters most when other processes share the cores, and fewer than ~512
# rows per matmul make MKL re-read the key matrix too often. On a GPU, bigger chunks keep the matmuls
# efficient while staying far below the full matrix.
_CHUNKING = {"cpu": (2**24, 512), "cuda": (2**27, 128)}
_PAIR_CAP_PER_ROW = 8      # same-patient exclusions kept as index pairs up to this many per query/key
# The single-process path shifts every logit by the bound 1/tau instead of a row maximum; exp(s - 1/tau)
# then lies in [exp(-2/tau), 1], which must stay a normal number: 2/tau up to 80 in float32 (tau >= 0.025),
# 700 in float64. Smaller temperatures take the general path.
_FIXED_SHIFT_RANGE = {torch.float32: 80.0, torch.float64: 700.0}


class NTXentOutput(NamedTuple):
    loss: torch.Tensor         # 0-dim, float32/float64, differentiable: this rank's share (see nt_xent)
    accuracy: torch.Tensor     # 0-dim float64, detached: contrastive top-1 over all ranks' valid queries
    num_valid: torch.Tensor    # 0-dim int64: valid queries over all ranks (two per valid pair)
    global_loss: torch.Tensor  # 0-dim float64, detached: mean loss over all ranks' valid queries


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, patient: torch.Tensor | None = None,
            valid: torch.Tensor | None = None, exclude_same_patient: bool = False, chunk_size: int | None = None,
            group=None) -> NTXentOutput:
    """NT-Xent of the pairs (z1[i], z2[i]) of this rank against the keys of every rank.

    z1, z2: (B, D) embeddings of the two views, any float dtype (B equal on every rank).
    patient: int64 (B,) patient hash, equal across ranks for one patient (needed for exclude_same_patient;
        compared as given, so a placeholder id on valid entries would make them one patient).
    valid: bool (B,); False entries (padding, skipped images) are neither queries nor keys.
    chunk_size: query rows per logit chunk; None picks it from the problem size.
    group: the process group (default: the world; with no process group, single process).

    Queries are this rank's 2B normalized views Q = [z1; z2]; keys are every rank's [z1; z2], gathered
    with gradient. The positive of view 1 of pair i is view 2 of pair i and vice versa (positives by pair
    identity: MICLe is the same loss fed with two different images of one patient). Each query's
    denominator holds every valid key except itself; with exclude_same_patient also except the keys of
    other pairs of the same patient (false negatives); the positive is always kept. Logits and their
    log-sum-exp are float32 (float64 if an input is float64) whatever the model precision, autocast
    included.

    Scaling. The global loss is L = (1/N) sum_q l_q over the N valid queries of all ranks. DDP and
    DeepSpeed average parameter gradients over the R ranks, and the gathered keys' backward sums over
    ranks, so the gradient they produce is (1/R) d/dtheta sum_r loss_r. Returning
        loss_r = (R / N) * sum_{valid local q} l_q      (N all-reduced, no gradient)
    makes that (1/R) * (R / N) * d/dtheta sum_q l_q = dL/dtheta exactly, also when ranks hold different
    numbers of valid queries (padding). With all entries valid, N = 2BR and loss_r is the local mean; no
    further factor of R belongs anywhere. Consequently the gradient w.r.t. this rank's embeddings is R
    times that of L; and the mean of loss_r over ranks is L, which `global_loss` reports directly.

    Memory. Logits are formed chunk by chunk of queries; the backward saves only Q, K, per-query
    log-sum-exp and indices, and recomputes each chunk (softmax - one-hot) to produce dQ and dK, so the
    peak is O(chunk * 2BR + 2BR * D) instead of O(2B * 2BR). With one process the queries are the keys
    and the logit matrix is symmetric: each off-diagonal block is then computed once and serves both its
    rows and its columns, which halves the matmul work (same result, to rounding).

    Returns NTXentOutput(loss, accuracy, num_valid, global_loss); accuracy is the fraction of valid queries
    whose positive logit is strictly above every other allowed key's. All ranks must call this together.
    """
    _check_inputs(z1, z2, temperature, patient, valid, exclude_same_patient, chunk_size)
    batch, dev = z1.shape[0], z1.device
    dtype = torch.float64 if torch.float64 in (z1.dtype, z2.dtype) else torch.float32
    n_ranks, me = world_size(group), rank(group)

    with torch.autocast(dev.type, enabled=False):
        q_all = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)          # (2B, D)
        k_all = gather_with_grad(q_all, group)                             # (2B*R, D), rank blocks [z1; z2]

        # One small collective for both per-sample fields, always, so every rank runs the same collectives.
        with torch.no_grad():
            ok = torch.ones(batch, dtype=torch.bool, device=dev) if valid is None else valid.to(dev, torch.bool)
            pat = (torch.zeros(batch, dtype=torch.int64, device=dev) if patient is None
                   else patient.to(dev, torch.int64))
            meta = gather_nograd(torch.stack([pat, ok.to(torch.int64)], 1), group)   # (B*R, 2)
            plan = _plan(meta, batch, me, n_ranks, exclude_same_patient, chunk_size, dev)

        q = q_all if plan.q_keep is None else q_all.index_select(0, plan.q_keep)
        if n_ranks == 1 and 2.0 / temperature <= _FIXED_SHIFT_RANGE[dtype]:
            # One process: the kept keys are the kept queries, in the same order.
            losses, correct = _SymmetricNTXent.apply(q, 1.0 / temperature, plan.pos, plan.mask_q, plan.mask_k,
                                                     plan.dense, plan.rows)
        else:
            k = k_all if plan.k_keep is None else k_all.index_select(0, plan.k_keep)
            losses, correct = _ChunkedNTXent.apply(q, k, 1.0 / temperature, plan.pos, plan.mask_q, plan.mask_k,
                                                   plan.dense, plan.rows)
        local_sum = losses.sum()
        stats = torch.stack([torch.full((), float(q.shape[0]), dtype=torch.float64, device=dev),
                             correct.sum().to(torch.float64), local_sum.detach().to(torch.float64)])
        stats = all_reduce_sum(stats, group)
        n_global = stats[0].clamp(min=1.0)     # no valid query anywhere: loss 0 (and zero gradients)
        loss = local_sum * (n_ranks / n_global).to(dtype)
    return NTXentOutput(loss, stats[1] / n_global, stats[0].to(torch.int64), stats[2] / n_global)


def _check_inputs(z1, z2, temperature, patient, valid, exclude_same_patient, chunk_size) -> None:
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"nt_xent: z1 and z2 must be (B, D) of one shape; got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    if not (z1.is_floating_point() and z2.is_floating_point()):
        raise ValueError(f"nt_xent: embeddings must be floating point; got {z1.dtype} and {z2.dtype}")
    if not temperature > 0:
        raise ValueError(f"nt_xent: temperature must be > 0; got {temperature}")
    for name, t in (("patient", patient), ("valid", valid)):
        if t is not None and tuple(t.shape) != (z1.shape[0],):
            raise ValueError(f"nt_xent: {name} must have shape ({z1.shape[0]},); got {tuple(t.shape)}")
    if exclude_same_patient and patient is None:
        raise ValueError("nt_xent: exclude_same_patient=True needs the patient tensor")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"nt_xent: chunk_size must be a positive int or None; got {chunk_size!r}")


class _Plan(NamedTuple):
    q_keep: torch.Tensor | None   # indices of valid local queries (None: all)
    k_keep: torch.Tensor | None   # indices of valid gathered keys (None: all)
    pos: torch.Tensor             # (n,) each kept query's positive, as an index into the kept keys
    mask_q: torch.Tensor          # (P,) kept-query index of each disallowed (query, key) pair
    mask_k: torch.Tensor          # (P,) kept-key index of that pair (itself, same-patient others)
    dense: tuple | None           # (pq, pk, sq, sk) when exclusions are too many for pairs
    rows: int                     # query rows per chunk


def _plan(meta, batch, me, n_ranks, exclude_same_patient, chunk_size, dev) -> _Plan:
    """Index bookkeeping, no gradient: which queries/keys take part, positives, masked pairs, chunking."""
    two_b = 2 * batch
    # Global sample id of every gathered key: rank block r holds [z1; z2] of samples r*B .. r*B+B-1.
    key_sample = (torch.arange(n_ranks, device=dev)[:, None] * batch
                  + torch.arange(batch, device=dev).repeat(2)[None, :]).reshape(-1)
    key_ok = meta[key_sample, 1].bool()
    local = torch.arange(two_b, device=dev)
    q_ok = key_ok[me * two_b:(me + 1) * two_b]

    k_keep = None if bool(key_ok.all()) else key_ok.nonzero().squeeze(1)
    q_keep = None if bool(q_ok.all()) else q_ok.nonzero().squeeze(1)
    new_index = local.new_full((key_ok.numel(),), -1)      # gathered key index -> kept key index
    new_index[key_ok] = torch.arange(int(key_ok.sum()), device=dev)

    q_local = local if q_keep is None else q_keep
    pos = new_index[me * two_b + (q_local + batch) % two_b]
    n = q_local.numel()
    mask_q, mask_k = torch.arange(n, device=dev), new_index[me * two_b + q_local]    # each query itself
    dense = None
    if exclude_same_patient:
        kept = key_sample if k_keep is None else key_sample[k_keep]
        pk, sk = meta[kept, 0], kept
        sq = me * batch + q_local % batch
        pq = meta[sq, 0]
        pairs = _same_patient_pairs(pq, sq, pk, sk, cap=_PAIR_CAP_PER_ROW * (n + pk.numel()))
        if pairs is None:
            dense = (pq, pk, sq, sk)
        else:
            mask_q, mask_k = torch.cat([mask_q, pairs[0]]), torch.cat([mask_k, pairs[1]])

    m = key_ok.numel() if k_keep is None else k_keep.numel()
    if chunk_size is not None:
        rows = int(chunk_size)
    else:
        budget, min_rows = _CHUNKING.get(dev.type, _CHUNKING["cuda"])
        rows = n if n * m <= budget else max(min_rows, budget // max(m, 1))
    return _Plan(q_keep, k_keep, pos, mask_q, mask_k, dense, max(1, min(rows, n)))


def _same_patient_pairs(pq, sq, pk, sk, cap):
    """(query, key) index pairs with the same patient but a different sample, or None past `cap` pairs."""
    order = torch.argsort(pk)
    pk_sorted = pk[order]
    lo = torch.searchsorted(pk_sorted, pq)
    count = torch.searchsorted(pk_sorted, pq, right=True) - lo
    total = int(count.sum())
    if total > cap:
        return None
    qi = torch.repeat_interleave(torch.arange(pq.numel(), device=pq.device), count)
    first = count.cumsum(0) - count
    kj = order[torch.arange(total, device=pq.device) + torch.repeat_interleave(lo - first, count)]
    other = sk[kj] != sq[qi]        # drops the query itself and its positive (same sample)
    return qi[other], kj[other]


def _chunk_pairs(pair_q, pair_k, rows, n, upper=False):
    """Group masked pairs by chunk of `rows` queries: (row within chunk, column, bounds), where chunk c's
    pairs are [bounds[c], bounds[c + 1]). With upper, only columns from the chunk's first query on are
    kept, numbered from there (the symmetric path's strips)."""
    first = pair_q - pair_q % rows
    if upper:
        keep = pair_k >= first
        pair_q, pair_k, first = pair_q[keep], pair_k[keep] - first[keep], first[keep]
    order = torch.argsort(pair_q, stable=True)
    pair_q, pair_k = pair_q[order], pair_k[order]
    starts = torch.arange(0, n + rows, rows, device=pair_q.device).clamp(max=n)
    return pair_q % rows, pair_k, torch.searchsorted(pair_q, starts).tolist()


def _chunk_logits(q_scaled: torch.Tensor, k_t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(c, D) @ (D, M) -> (c, M) logits written into `out`, in the compute dtype."""
    return torch.mm(q_scaled, k_t, out=out)


def _mask_chunk(logits, start, end, col0, pairs, c, dense, neg_inf) -> None:
    """Set the disallowed logits of query rows start..end (key columns col0..) to -inf, in place."""
    rows, cols, bounds = pairs
    lo, hi = bounds[c], bounds[c + 1]
    if hi > lo:
        logits.index_put_((rows[lo:hi], cols[lo:hi]), neg_inf)
    if dense is not None:
        pq, pk, sq, sk = dense
        same = (pq[start:end, None] == pk[None, col0:]) & (sq[start:end, None] != sk[None, col0:])
        logits.masked_fill_(same, float("-inf"))


class _ChunkedNTXent(torch.autograd.Function):
    """Per-query losses l_q = logsumexp_{allowed j}(s_qj) - s_q,pos with s = (q / tau) . k, chunked.

    Saves q, k, the per-query log-sum-exp and indices; the backward recomputes each chunk's logits,
    turns them into the softmax P in place, and uses dl/ds = P - onehot(pos). Per chunk only a handful
    of large in-place ops run (a matmul and full-row passes); everything per query is done once for all
    chunks, so small-op overhead does not grow with the number of chunks.
    """

    @staticmethod
    def forward(ctx, q, k, inv_tau, pos, mask_q, mask_k, dense, rows):
        n = q.shape[0]
        pairs = _chunk_pairs(mask_q, mask_k, rows, n)
        k_t = k.t()
        q_scaled = q * inv_tau
        neg_inf = q.new_full((), float("-inf"))
        s_pos, neg_max, neg_sum = q.new_empty(n, 1), q.new_empty(n), q.new_empty(n)
        buf = q.new_empty(min(rows, n), k.shape[0])
        for c, start in enumerate(range(0, n, rows)):
            end = min(start + rows, n)
            logits = _chunk_logits(q_scaled[start:end], k_t, buf[:end - start])
            _mask_chunk(logits, start, end, 0, pairs, c, dense, neg_inf)
            p = pos[start:end, None]
            torch.gather(logits, 1, p, out=s_pos[start:end])
            logits.scatter_(1, p, float("-inf"))
            # Log-sum-exp over the negatives, shifted by the row max so that nothing overflows in any
            # precision; done in place on the chunk. The row max doubles as the accuracy criterion.
            torch.amax(logits, 1, out=neg_max[start:end])
            torch.sum(logits.sub_(neg_max[start:end, None]).exp_(), 1, out=neg_sum[start:end])
        s_pos = s_pos.squeeze(1)
        # A row without negatives has max -inf (and a NaN sum from -inf - -inf): its log-sum-exp is -inf.
        neg_lse = torch.where(torch.isneginf(neg_max), neg_max, neg_max + neg_sum.log())
        lse = torch.logaddexp(neg_lse, s_pos)
        correct = s_pos > neg_max
        ctx.save_for_backward(q, k, lse, pos, *pairs[:2])
        ctx.inv_tau, ctx.bounds, ctx.dense, ctx.rows = inv_tau, pairs[2], dense, rows
        ctx.mark_non_differentiable(correct)
        return lse - s_pos, correct

    @staticmethod
    def backward(ctx, grad_losses, _grad_correct):
        q, k, lse, pos, mask_row, mask_col = ctx.saved_tensors
        pairs = (mask_row, mask_col, ctx.bounds)
        inv_tau, rows, n = ctx.inv_tau, ctx.rows, q.shape[0]
        want_q, want_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(q.device.type, enabled=False):
            k_t = k.t()
            q_scaled = q * inv_tau
            g_q = q_scaled * grad_losses[:, None]
            neg_inf = q.new_full((), float("-inf"))
            pk = torch.empty_like(q) if want_q else None        # P @ K, row by row
            dk = torch.zeros_like(k) if want_k else None
            buf = q.new_empty(min(rows, n), k.shape[0])
            for c, start in enumerate(range(0, n, rows)):
                end = min(start + rows, n)
                probs = _chunk_logits(q_scaled[start:end], k_t, buf[:end - start])
                _mask_chunk(probs, start, end, 0, pairs, c, ctx.dense, neg_inf)
                probs.sub_(lse[start:end, None]).exp_()          # softmax over allowed keys; masked -> 0
                if want_q:
                    torch.mm(probs, k, out=pk[start:end])
                if want_k:   # dl/dk = (P - onehot)^T @ (q / tau), the one-hot part after the loop
                    dk.addmm_(probs.t(), g_q[start:end])
            dq = (pk - k[pos]) * (grad_losses * inv_tau)[:, None] if want_q else None   # (1/tau)(P - onehot) K
            if want_k:
                dk.index_add_(0, pos, g_q, alpha=-1)
        return dq, dk, None, None, None, None, None, None


class _SymmetricNTXent(torch.autograd.Function):
    """The same per-query losses when the keys are the queries x themselves (one process).

    S = (x / tau) x^T is symmetric, and so are the masks (itself, same patient) and the pairing
    (pos[pos[i]] = i). The rows are processed in strips [r0, r1) against columns r0.. only: a strip's
    logits give its own rows' statistics and, through its columns beyond the diagonal block, the later
    rows' statistics, so every off-diagonal logit is computed once instead of twice. Summing over strips
    needs one shift for rows and columns alike: the bound 1/tau of the logits of unit vectors (see
    _FIXED_SHIFT_RANGE). With E = exp(S - 1/tau) (0 where masked) and a_i = g_i exp(1/tau - lse_i), the
    gradient d(sum_i g_i l_i)/dx = (A x) / tau - (g_i + g_pos(i)) x_pos(i) / tau, A_ij = E_ij (a_i + a_j).
    """

    @staticmethod
    def forward(ctx, x, inv_tau, pos, mask_q, mask_k, dense, rows):
        n = x.shape[0]
        shift = inv_tau
        x_scaled = x * inv_tau
        s_pos = (x_scaled * x[pos]).sum(1)
        # The forward leaves positives out of the sums (they join through logaddexp), the backward keeps them.
        fwd_pairs = _chunk_pairs(torch.cat([mask_q, torch.arange(n, device=x.device)]), torch.cat([mask_k, pos]),
                                 rows, n, upper=True)
        bwd_pairs = _chunk_pairs(mask_q, mask_k, rows, n, upper=True)
        neg_inf = x.new_full((), float("-inf"))
        neg_max = x.new_full((n,), float("-inf"))
        neg_sum = x.new_zeros(n)
        ones = x.new_ones(min(rows, n))
        flat = x.new_empty(min(rows, n) * n)
        for c, r0 in enumerate(range(0, n, rows)):
            r1 = min(r0 + rows, n)
            h, w = r1 - r0, n - r0
            s = _chunk_logits(x_scaled[r0:r1], x[r0:].t(), flat[:h * w].view(h, w))
            _mask_chunk(s, r0, r1, r0, fwd_pairs, c, dense, neg_inf)
            torch.maximum(neg_max[r0:r1], s.amax(1), out=neg_max[r0:r1])
            torch.maximum(neg_max[r1:], s[:, h:].amax(0), out=neg_max[r1:])
            s.sub_(shift).exp_()
            neg_sum[r0:r1] += s.sum(1)
            neg_sum[r1:].addmv_(s[:, h:].t(), ones[:h])      # column sums; a strided sum(0) is ~2x slower
        lse = torch.logaddexp(shift + neg_sum.log(), s_pos)      # log 0 = -inf: a row without negatives
        correct = s_pos > neg_max
        ctx.save_for_backward(x, lse, pos, *bwd_pairs[:2])
        ctx.inv_tau, ctx.bounds, ctx.dense, ctx.rows = inv_tau, bwd_pairs[2], dense, rows
        ctx.mark_non_differentiable(correct)
        return lse - s_pos, correct

    @staticmethod
    def backward(ctx, grad_losses, _grad_correct):
        x, lse, pos, mask_row, mask_col = ctx.saved_tensors
        pairs = (mask_row, mask_col, ctx.bounds)
        inv_tau, rows, n = ctx.inv_tau, ctx.rows, x.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            x_scaled = x * inv_tau
            a = grad_losses * torch.exp(inv_tau - lse)
            neg_inf = x.new_full((), float("-inf"))
            dx = torch.zeros_like(x)
            flat = x.new_empty(min(rows, n) * n)
            weight = x.new_empty(min(rows, n) * n)
            for c, r0 in enumerate(range(0, n, rows)):
                r1 = min(r0 + rows, n)
                h, w = r1 - r0, n - r0
                e = _chunk_logits(x_scaled[r0:r1], x[r0:].t(), flat[:h * w].view(h, w))
                _mask_chunk(e, r0, r1, r0, pairs, c, ctx.dense, neg_inf)
                e.sub_(inv_tau).exp_()
                e.mul_(torch.add(a[r0:r1, None], a[None, r0:], out=weight[:h * w].view(h, w)))    # A, strip
                dx[r0:r1].addmm_(e, x_scaled[r0:])
                dx[r1:].addmm_(e[:, h:].t(), x_scaled[r0:r1])
            dx.sub_(x_scaled[pos] * (grad_losses + grad_losses[pos])[:, None])
        return dx, None, None, None, None, None, None
