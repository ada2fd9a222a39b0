"""BatchNorm over attention logits that are never materialised.

The official binary term normalises the stacked ``(N, heads, HW, HW)`` similarity logits with a
BatchNorm. Softmax ignores the additive part of that BN (it is constant along each row), so all the
fused path needs is the per-head *scale* ``gamma / sqrt(var + eps)``; in training ``var`` is the batch
variance over ``(N, HW, HW)``. The helpers here compute the mean and variance of the logits from low-order
moments of ``q``, ``k`` and the relative logits in ``O(HW d^2)`` instead of ``O((HW)^2)``, using centred
sums (per sample, then combined with the law of total variance) so that no large moments are subtracted.
They are computed in at least float32 (float64 for float64 inputs); the result is differentiable.

Padded batches (:class:`~lesa.layers.padding.KeyMask`): the batch statistics count only what lies inside the
images, the positions ``V_n`` of each image ``n`` for ``bn_qkv`` / ``bn_out`` and the pairs ``V_n x V_n``
(valid query, valid key) for the logit BN. The ``masked_*`` helpers take 0/1 weights for that:
:func:`masked_batch_norm` on materialised tensors, :func:`masked_dot_product_moments` and
:func:`masked_separable_moments` for the fused path, whose per-image moments (over different counts)
:func:`masked_bn_logit_affine` merges.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def stats_dtype(t: Tensor) -> torch.dtype:
    """float32 for float32 / half inputs (the centred sums need no more), float64 for float64 ones."""
    return torch.promote_types(t.dtype, torch.float32)


def combine_moments(mean: Tensor, m2: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Merge per-sample ``(N, G)`` means and centred second moments (each over ``count`` values).

    Returns the per-head mean and biased variance over all ``N * count`` values.
    """
    total_mean = mean.mean(0)
    m2_total = m2.sum(0) + count * (mean - total_mean).square().sum(0)
    return total_mean, m2_total / (mean.shape[0] * count)


def dot_product_moments(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample mean and centred second moment of ``q_i . k_j`` over all ``(i, j)``.

    ``q``, ``k``: ``(N, G, P, d)``. With ``q = q' + q_bar`` and ``k = k' + k_bar``,
    ``q_i.k_j - q_bar.k_bar = q'_i.k'_j + q'_i.k_bar + q_bar.k'_j`` and the three parts are orthogonal
    over ``(i, j)``, so ``M2 = <Q'^T Q', K'^T K'> + P k_bar^T Q'^T Q' k_bar + P q_bar^T K'^T K' q_bar``.
    """
    return DotProductMoments.apply(q, k)


class DotProductMoments(torch.autograd.Function):
    """:func:`dot_product_moments` with its gradient in closed form (a few small products instead of
    autograd's graph of small ops). With ``A_q = K'^T K' + P k_bar k_bar^T`` (symmetric), the centred
    ``q'`` sums to zero over positions, so ``dM2/dq_i = 2 A_q q'_i + 2 K'^T K' q_bar`` and
    ``dmean/dq_i = k_bar / P``; likewise for ``k``."""

    @staticmethod
    def forward(ctx, q, k):
        num = q.shape[-2]
        q_bar, k_bar = q.mean(-2, keepdim=True), k.mean(-2, keepdim=True)
        qc, kc = q - q_bar, k - k_bar
        gram_q, gram_k = qc.transpose(-1, -2) @ qc, kc.transpose(-1, -2) @ kc
        gk_q = (q_bar @ gram_k).squeeze(-2)  # (N, G, d): K'^T K' q_bar
        gq_k = (k_bar @ gram_q).squeeze(-2)
        q_bar, k_bar = q_bar.squeeze(-2), k_bar.squeeze(-2)
        m2 = (gram_q * gram_k).sum((-1, -2)) + num * ((gq_k * k_bar).sum(-1) + (gk_q * q_bar).sum(-1))
        ctx.save_for_backward(qc, kc, gram_q, gram_k, q_bar, k_bar, gq_k, gk_q)
        return (q_bar * k_bar).sum(-1), m2

    @staticmethod
    def backward(ctx, grad_mean, grad_m2):
        qc, kc, gram_q, gram_k, q_bar, k_bar, gq_k, gk_q = ctx.saved_tensors
        num = qc.shape[-2]
        gm, gv = grad_mean[..., None], grad_m2[..., None]
        a_q = gram_k + num * k_bar.unsqueeze(-1) * k_bar.unsqueeze(-2)
        a_k = gram_q + num * q_bar.unsqueeze(-1) * q_bar.unsqueeze(-2)
        grad_q = (qc @ a_q) * (2 * gv.unsqueeze(-1)) + (gm * k_bar / num + 2 * gv * gk_q).unsqueeze(-2)
        grad_k = (kc @ a_k) * (2 * gv.unsqueeze(-1)) + (gm * q_bar / num + 2 * gv * gq_k).unsqueeze(-2)
        return grad_q, grad_k


def masked_dot_product_moments(q: Tensor, k: Tensor, weight: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`dot_product_moments` over the pairs ``(i, j)`` of positions inside each image.

    ``q``, ``k``: ``(N, G, P, d)``; ``weight``: ``(N, 1, P, 1)``, 1 inside the image, 0 in its padding;
    ``count``: ``(N, 1)`` positions inside, ``V``. With means ``q_bar``, ``k_bar`` over those positions the
    centred parts sum to zero over them, so the same orthogonal split holds with ``P`` replaced by ``V`` and
    ``Q'``, ``K'`` zero outside: ``M2 = <Q'^T Q', K'^T K'> + V k_bar^T Q'^T Q' k_bar + V q_bar^T K'^T K' q_bar``
    (``(N, G)`` each, over ``V^2`` pairs; autograd differentiates it).
    """
    per_image = count[..., None, None]
    q_bar = (q * weight).sum(-2, keepdim=True) / per_image
    k_bar = (k * weight).sum(-2, keepdim=True) / per_image
    qc, kc = (q - q_bar) * weight, (k - k_bar) * weight
    gram_q, gram_k = qc.transpose(-1, -2) @ qc, kc.transpose(-1, -2) @ kc
    cross = k_bar @ gram_q @ k_bar.transpose(-1, -2) + q_bar @ gram_k @ q_bar.transpose(-1, -2)
    m2 = (gram_q * gram_k).sum((-1, -2)) + count * cross[..., 0, 0]
    return (q_bar * k_bar).sum(-1)[..., 0], m2


def separable_moments(rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample moments of ``rows[i, y] + cols[i, x]`` over queries ``i`` and keys ``(y, x)``.

    ``rows``: ``(N, G, P, H)``, ``cols``: ``(N, G, P, W)`` with ``P = H * W`` (the 2-D relative logits).
    Within one query the two parts vary independently, so the centred sum of squares splits.
    """
    height, width = rows.shape[-1], cols.shape[-1]
    r_bar, c_bar = rows.mean(-1, keepdim=True), cols.mean(-1, keepdim=True)
    within = width * (rows - r_bar).square().sum(-1) + height * (cols - c_bar).square().sum(-1)
    return _merge_rows(r_bar.squeeze(-1) + c_bar.squeeze(-1), within, rows.shape[-2])


def masked_separable_moments(rows: Tensor, cols: Tensor, row_weight: Tensor, col_weight: Tensor,
                             query_weight: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`separable_moments` over the queries and keys inside each image.

    ``row_weight``: ``(N, 1, 1, H)`` and ``col_weight``: ``(N, 1, 1, W)``, 1 for the ``h`` rows and ``w``
    columns inside; ``query_weight``: ``(N, 1, P)``, 1 for the ``V = h w`` positions inside. Per query the
    keys inside are the ``h x w`` grid of those rows and columns, so the split holds with ``H, W`` replaced
    by ``h, w``; the queries then merge over ``V`` (each over ``h w`` keys): ``(N, G)`` moments over ``V^2``.
    """
    height, width = row_weight.sum(-1), col_weight.sum(-1)  # (N, 1, 1)
    r_bar = (rows * row_weight).sum(-1) / height
    c_bar = (cols * col_weight).sum(-1) / width
    within = (width * ((rows - r_bar.unsqueeze(-1)).square() * row_weight).sum(-1)
              + height * ((cols - c_bar.unsqueeze(-1)).square() * col_weight).sum(-1))
    row_mean = r_bar + c_bar  # (N, G, P)
    mean = (row_mean * query_weight).sum(-1) / query_weight.sum(-1)
    spread = ((row_mean - mean.unsqueeze(-1)).square() * query_weight).sum(-1)
    return mean, (within * query_weight).sum(-1) + (height * width)[..., 0] * spread


def sliding_window_moments(x: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample moments of ``x_i . table[:, i + t]`` over ``i, t in [0, P)`` (the flat relative logits).

    ``x``: ``(N, G, P, d)``; ``table``: ``(d, 2P-1)``. Row ``i`` sees the window ``table[:, i:i+P]``, whose
    sum and sum of outer products are window sums over the table's columns (:func:`window_sums`).
    """
    row_sum, row_sq = SlidingWindowRows.apply(x, table)
    num = x.shape[-2]
    row_mean = row_sum / num
    return _merge_rows(row_mean, row_sq - num * row_mean.square(), num)


BAND_MAX_POSITIONS = 256  # window sums as one product with a band matrix up to here; prefix sums beyond


def window_sums(cols: Tensor, num: int) -> Tensor:
    """``(2P-1, ...)`` -> ``(P, ...)``: entry ``i`` sums ``cols[i : i + P]``."""
    if num <= BAND_MAX_POSITIONS:  # one product: faster than a scan for small maps, O(P^2) beyond
        return (window_band(num, cols) @ cols.flatten(1)).view(num, *cols.shape[1:])
    prefix = torch.cat([cols.new_zeros(1, *cols.shape[1:]), cols.cumsum(0)])
    return prefix[num:] - prefix[:num]


def window_sums_adjoint(grad: Tensor, num: int) -> Tensor:
    """Adjoint of :func:`window_sums`: ``(P, ...)`` -> ``(2P-1, ...)``, entry ``m`` summing the windows
    ``i`` that contain ``m`` (``max(0, m-P+1) <= i <= min(m, P-1)``)."""
    if num <= BAND_MAX_POSITIONS:
        return (window_band(num, grad).t() @ grad.flatten(1)).view(2 * num - 1, *grad.shape[1:])
    prefix = torch.cat([grad.new_zeros(1, *grad.shape[1:]), grad.cumsum(0)])
    m = torch.arange(2 * num - 1, device=grad.device)
    return prefix[m.clamp(max=num - 1) + 1] - prefix[(m - num + 1).clamp(min=0)]


def window_band(num: int, like: Tensor) -> Tensor:
    """``(P, 2P-1)`` ones where ``i <= m <= i + P - 1``."""
    return torch.ones(num, 2 * num - 1, dtype=like.dtype, device=like.device).triu_().tril_(num - 1)


class SlidingWindowRows(torch.autograd.Function):
    """Per row ``i``: ``sum_t x_i . c_{i+t}`` and ``sum_t (x_i . c_{i+t})^2 = x_i^T W_i x_i`` with
    ``W_i = sum_t c_{i+t} c_{i+t}^T`` (``c_m = table[:, m]``), and their gradients in closed form:
    ``d/dx_i = g1_i w_i + 2 g2_i W_i x_i``; the table's through the adjoint window sums."""

    @staticmethod
    def forward(ctx, x, table):
        num, dim = x.shape[-2], x.shape[-1]
        cols = table.t()
        win1 = window_sums(cols, num)
        win2 = window_sums(cols.unsqueeze(-1) * cols.unsqueeze(-2), num)
        by_row = x.permute(2, 0, 1, 3).reshape(num, -1, dim)  # (P, N*G, d): one product per position
        x_win2 = torch.bmm(by_row, win2)
        row_sq = (x_win2 * by_row).sum(-1).t().reshape(x.shape[:-1])
        ctx.save_for_backward(by_row, table, win1, x_win2)
        ctx.batch_shape = x.shape[:-2]
        return (x * win1).sum(-1), row_sq

    @staticmethod
    def backward(ctx, grad_sum, grad_sq):
        by_row, table, win1, x_win2 = ctx.saved_tensors
        num, dim = by_row.shape[0], by_row.shape[-1]
        g1 = grad_sum.reshape(-1, num).t().unsqueeze(-1)  # (P, N*G, 1)
        g2 = grad_sq.reshape(-1, num).t().unsqueeze(-1)
        grad_rows = g1 * win1.unsqueeze(1) + 2 * g2 * x_win2
        grad_x = grad_rows.reshape(num, *ctx.batch_shape, dim).permute(*range(1, len(ctx.batch_shape) + 1), 0,
                                                                        len(ctx.batch_shape) + 1)
        grad_win1 = (g1 * by_row).sum(1)  # (P, d)
        grad_win2 = torch.bmm(by_row.transpose(1, 2), g2 * by_row)  # (P, d, d), symmetric
        grad_cols = window_sums_adjoint(grad_win1, num)
        grad_cols += 2 * torch.bmm(window_sums_adjoint(grad_win2, num), table.t().unsqueeze(-1)).squeeze(-1)
        return grad_x, grad_cols.t()


def _merge_rows(row_mean: Tensor, row_m2: Tensor, per_row: int) -> tuple[Tensor, Tensor]:
    """Per-row (mean, centred M2) over ``per_row`` values each -> per-sample moments."""
    mean = row_mean.mean(-1)
    return mean, row_m2.sum(-1) + per_row * (row_mean - mean.unsqueeze(-1)).square().sum(-1)


def uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """Whether ``bn`` normalises with the batch's statistics (training, or no running statistics)."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def bn_logit_affine(bn: nn.BatchNorm2d, moments: list[tuple[Tensor, Tensor]], count: int) -> tuple[Tensor, Tensor]:
    """The per-channel ``(scale, shift)`` that ``bn(stacked)`` applies with batch statistics:
    ``y = scale * x + shift``.

    ``moments``: for each stacked term, per-sample ``(mean, M2)`` of shape ``(N, G)``, each over ``count``
    values; the BN's channels are the terms' heads in order. In training the running statistics are
    updated exactly as :class:`torch.nn.BatchNorm2d` would (unbiased variance, momentum or cumulative
    average). ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale`` (length ``terms * G``).

    An empty batch (``N = 0``) has no statistics: as :class:`torch.nn.BatchNorm2d`, it counts in
    ``num_batches_tracked`` and leaves the running mean and variance untouched; its (empty) logits are then
    scaled with mean 0 and variance 1, so that every gradient stays finite (zero) instead of NaN.
    """
    means = torch.cat([m for m, _ in moments], dim=1)
    m2s = torch.cat([v for _, v in moments], dim=1)
    n = means.shape[0] * count
    if n == 0:
        mean, var = means.new_zeros(means.shape[1]), means.new_ones(means.shape[1])
    else:
        mean, var = combine_moments(means, m2s, count)
    if bn.training and bn.running_mean is not None:
        update_running_stats(bn, mean.detach(), var.detach(), n)
    return _affine(bn, mean, torch.rsqrt(var + bn.eps))


def masked_bn_logit_affine(bn: nn.BatchNorm2d, moments: list[tuple[Tensor, Tensor]],
                           counts: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`bn_logit_affine` where sample ``n``'s moments are over ``counts[n]`` values (``(N, 1)``: the
    pairs inside each image of a padded batch). Per-image means and centred sums merge weighted by their
    counts; the running statistics are updated with the total count (a tensor: no host synchronisation)."""
    means = torch.cat([m for m, _ in moments], dim=1)
    if means.shape[0] == 0:
        return bn_logit_affine(bn, moments, 0)
    m2s = torch.cat([v for _, v in moments], dim=1)
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    var = (m2s.sum(0) + (counts * (means - mean).square()).sum(0)) / total
    if bn.training and bn.running_mean is not None:
        update_running_stats(bn, mean.detach(), var.detach(), total.detach())
    return _affine(bn, mean, torch.rsqrt(var + bn.eps))


def masked_batch_norm(bn: nn.BatchNorm2d, x: Tensor, weight: Tensor) -> Tensor:
    """``bn(x)``, its batch statistics over the entries where ``weight`` is 1 (what lies inside the images of
    a padded batch); with running statistics (eval) the weight changes nothing.

    ``x``: ``(N, C, ...)``; ``weight``: 0/1, ``(N, 1, ...)`` (one weight per entry of a channel). In training
    the running statistics are updated as :class:`torch.nn.BatchNorm2d` would over the weighted entries alone.
    """
    if not uses_batch_stats(bn) or x.shape[0] == 0:
        return bn(x)
    dtype = stats_dtype(x)
    xs, weight = x.to(dtype), weight.to(dtype)
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    count = weight.sum()
    mean = (xs * weight).sum(dims) / count
    var = ((xs - mean.view(shape)).square() * weight).sum(dims) / count
    if bn.training and bn.running_mean is not None:
        update_running_stats(bn, mean.detach(), var.detach(), count.detach())
    scale, shift = _affine(bn, mean, torch.rsqrt(var + bn.eps))
    return (xs * scale.view(shape) + shift.view(shape)).to(x.dtype)


def interleaved_batch_norm(bn: nn.BatchNorm2d, a: Tensor, b: Tensor) -> Tensor:
    """``bn`` over ``a`` and ``b`` ``(N, C, H, W)`` with their channels interleaved (``bn``'s channel ``2c`` is
    ``a``'s channel ``c``, ``2c + 1`` is ``b``'s), the two normalised halves summed:
    ``bn(stack([a, b], 2).flatten(1, 2)).unflatten(1, (C, 2)).sum(2)``, without the stacked ``(N, 2C, H, W)``
    tensor (a copy in eager mode; under torch.compile on the CPU a layout that inductor reduced element by
    element). Statistics, running-statistics updates and the empty batch as :func:`bn_logit_affine`."""
    dtype = stats_dtype(a)
    if uses_batch_stats(bn):
        n = a.shape[0] * a.shape[2] * a.shape[3]
        if n == 0:
            mean, var = a.new_zeros(2 * a.shape[1], dtype=dtype), a.new_ones(2 * a.shape[1], dtype=dtype)
        else:
            (var_a, mean_a), (var_b, mean_b) = (torch.var_mean(t.to(dtype), dim=(0, 2, 3), correction=0)
                                                for t in (a, b))
            mean, var = torch.stack([mean_a, mean_b], 1).flatten(), torch.stack([var_a, var_b], 1).flatten()
        if bn.training and bn.running_mean is not None:
            update_running_stats(bn, mean.detach(), var.detach(), n)
        scale, shift = _affine(bn, mean, torch.rsqrt(var + bn.eps))
    else:
        scale, shift = running_affine(bn, dtype)
    # in at least float32: the mean rides in the shift, and a bfloat16 product would cancel against it
    scale = scale.view(1, -1, 2, 1, 1)
    out = a.to(dtype) * scale[:, :, 0] + b.to(dtype) * scale[:, :, 1] + shift.view(1, -1, 2, 1, 1).sum(2)
    return out.to(a.dtype)


def update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, n: int | Tensor) -> None:
    """Fold a batch's ``mean`` and biased ``var`` over ``n`` values into ``bn``'s running statistics, as
    :class:`torch.nn.BatchNorm2d` does in training (unbiased variance, momentum or cumulative average).
    ``n``: an int, or a tensor where it is counted on the device (padding masks)."""
    factor = 0.0
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    if not isinstance(n, Tensor) and n == 0:  # an empty batch counts but has no statistics (nn.BatchNorm2d)
        return
    with torch.no_grad():
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
        unbiased = var * (n / (n - 1).clamp(min=1) if isinstance(n, Tensor) else n / max(n - 1, 1))
        bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def running_affine(bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` of ``bn`` in eval mode, from its running statistics (no moments needed)."""
    return _affine(bn, bn.running_mean.to(dtype), torch.rsqrt(bn.running_var.to(dtype) + bn.eps))


def _affine(bn: nn.BatchNorm2d, mean: Tensor, inv_std: Tensor) -> tuple[Tensor, Tensor]:
    scale = inv_std if bn.weight is None else inv_std * bn.weight.to(inv_std.dtype)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(shift.dtype)
    return scale, shift
