"""An independent, deliberately naive computation of LESA (Eq. 5-7) from a module's parameters.

Written from the paper and the authors' layout, without any of the library's tricks: relative offsets come
from explicit coordinate arithmetic, BatchNorm is spelled out, the interleaved output channels of the
'flat' embedding are indexed by hand. Used in float64 to check every implementation path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_norm(x, bn, training, dims):
    """Manual BatchNorm over ``dims``; returns the output and the updated running stats."""
    shape = [1] * x.dim()
    shape[1] = -1
    if training:
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        n = x.numel() // x.shape[1]
        m = bn.momentum
        new_mean = (1 - m) * bn.running_mean + m * mean
        new_var = (1 - m) * bn.running_var + m * var * n / (n - 1)
    else:
        mean, var = bn.running_mean, bn.running_var
        new_mean, new_var = mean, var
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)
    return y, (new_mean, new_var)


def binary_term(b, x, training, drop_diagonal=False, attn_out=None):
    """``b``: a BinaryAttention2d. Returns (output, {bn name: (running_mean, running_var)}).

    ``drop_diagonal``: zero each query's own weight (Table 1's ablation); ``attn_out``: a list that
    receives the softmax matrix."""
    n, _, h, w = x.shape
    p = h * w
    g, dq, dv = b.heads, b.qk_dim, b.v_dim
    stats = {}
    qkv = F.conv2d(x, b.qkv.weight)
    qkv, stats["bn_qkv"] = batch_norm(qkv, b.bn_qkv, training, (0, 2, 3))
    qkv = qkv.reshape(n, g, 2 * dq + dv, p)
    q, k, v = qkv[:, :, :dq], qkv[:, :, dq : 2 * dq], qkv[:, :, 2 * dq :]  # (n, g, c, p)

    ys = torch.arange(p) // w
    xs = torch.arange(p) % w
    idx = torch.arange(p)
    terms = [torch.einsum("ngci,ngcj->ngij", q, k)]
    if b.pos_embed == "flat":
        table = b.rel_pos.relative
        tq, tk, tv = table[:dq], table[dq : 2 * dq], table[2 * dq :]
        off_qr = idx[:, None] - idx[None, :] + p - 1  # [i, j] -> i - j
        off_kr = idx[None, :] - idx[:, None] + p - 1  # [i, j] -> j - i
        terms.append(torch.einsum("ngci,cij->ngij", q, tq[:, off_qr]))
        terms.append(torch.einsum("ngcj,cij->ngij", k, tk[:, off_kr]))
    else:
        rh = b.rel_pos.height
        rw = b.rel_pos.width
        hh = (rh.shape[0] + 1) // 2
        hw = (rw.shape[0] + 1) // 2
        assert hh == h and hw == w, "naive reference covers the built size only"
        dy = ys[None, :] - ys[:, None] + h - 1  # key row - query row
        dx = xs[None, :] - xs[:, None] + w - 1
        terms.append(torch.einsum("ngci,ijc->ngij", q, rh[dy]) + torch.einsum("ngci,ijc->ngij", q, rw[dx]))
    stacked = torch.cat(terms, dim=1)
    stacked, stats["bn_logits"] = batch_norm(stacked, b.bn_logits, training, (0, 2, 3))
    logits = sum(stacked[:, t * g : (t + 1) * g] for t in range(len(terms)))
    attn = torch.softmax(logits, dim=-1)
    if attn_out is not None:
        attn_out.append(attn)
    if drop_diagonal:
        attn = attn * (1 - torch.eye(p, dtype=attn.dtype))
    sv = torch.einsum("ngij,ngcj->ngci", attn, v).reshape(n, g * dv, p)
    if b.pos_embed == "flat":
        sve = torch.einsum("ngij,cij->ngci", attn, tv[:, off_qr]).reshape(n, g * dv, p)
        both = torch.empty(n, 2 * g * dv, p, dtype=x.dtype)
        both[:, 0::2] = sv  # channel 2c is the value part, 2c+1 the value-embedding part
        both[:, 1::2] = sve
        normed, stats["bn_out"] = batch_norm(both, b.bn_out, training, (0, 2))
        out = normed[:, 0::2] + normed[:, 1::2]
    else:
        out, stats["bn_out"] = batch_norm(sv, b.bn_out, training, (0, 2))
    return out.reshape(n, g * dv, h, w), stats


def unary_term(u, x, training):
    out = F.conv2d(x, u.conv.weight, padding=1, groups=u.conv.groups)
    if u.proj is not None:
        out = F.conv2d(out, u.proj.weight)
    return batch_norm(out, u.bn, training, (0, 2, 3))


def lesa(layer, x, training, omega_out=None):
    """Eq. 5: m + omega * binary, omega from Eq. 7 as the official code builds F."""
    binary, stats = binary_term(layer.binary, x, training)
    stats = {f"binary.{k}": v for k, v in stats.items()}
    unary, stats["unary.bn"] = unary_term(layer.unary, x, training)
    if layer.fusion_gate is None:
        out = unary + binary
    else:
        gate = layer.fusion_gate
        hidden = F.conv2d(torch.relu(torch.cat([unary, binary], 1)), gate.fc1.weight)
        hidden, stats["fusion_gate.bn1"] = batch_norm(hidden, gate.bn1, training, (0, 2, 3))
        logits = F.conv2d(torch.relu(hidden), gate.fc2.weight)
        logits, stats["fusion_gate.bn2"] = batch_norm(logits, gate.bn2, training, (0, 2, 3))
        if omega_out is not None:
            omega_out.append(torch.sigmoid(logits))
        out = unary + torch.sigmoid(logits) * binary
    if layer.stride > 1:
        out = F.avg_pool2d(out, layer.stride)
    return out, stats
