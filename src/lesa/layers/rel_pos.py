"""Relative position embeddings of the binary (context) term.

Eq. 1 of the paper adds ``q_ij^T r_{(i,j)->(h,w)}`` to the attention logits. The authors' code has two
forms of ``r``, both reproduced here with their checkpoint layouts:

* :class:`FlatRelPosEmbed` (``pos_embed='flat'``, the official *classification* embedding, after
  Axial-DeepLab): one table over the offset between raster-flattened positions ``i - j``, with separate
  query, key and value parts. It is tied to the feature-map size it was built for.
* :class:`RelPosEmbed2d` (``pos_embed='rel2d'``, the official *detection* embedding): separate height and
  width tables; the logit is ``q_i . r_h[y_j - y_i] + q_i . r_w[x_j - x_i]``. It works at any map size:
  smaller maps crop the tables, larger ones interpolate them (:func:`resize_rel_table`).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .checks import check_int, check_size2d
from .factory import takes_factory_kwargs

Size2d = Union[int, tuple[int, int]]
FEATURE_SIZE_HINT = "the input map size the position tables are built for"


def to_2tuple(size: Size2d) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def offset_index(length: int, device: torch.device) -> Tensor:
    """``(L, L)`` index ``[i, j] = i - j + L - 1``: the column of offset ``i - j`` in a ``2L-1`` table.

    Used while tracing (``torch.jit.trace``, the TorchScript ONNX exporter) instead of ``Tensor.unfold``, which that
    exporter translates only for a constant size: under a dynamic batch axis the traced map size is not one
    (``arange`` and ``Gather`` export at any size).
    """
    positions = torch.arange(length, device=device)
    return positions.unsqueeze(1) - positions.unsqueeze(0) + (length - 1)


def toeplitz_expand(table: Tensor, length: int) -> Tensor:
    """``(d, 2L-1)`` table of offsets -> ``(d, L, L)`` with ``[c, i, j] = table[c, i - j + L - 1]``."""
    if torch.jit.is_tracing():  # see offset_index; in eager the strided view is ~20% faster (forward + backward)
        return table[:, offset_index(length, table.device)]
    return table.unfold(-1, length, 1).flip(-1)


def abs_from_rel(table: Tensor, length: int) -> Tensor:
    """``(2L-1, d)`` table of offsets -> ``(L, L, d)`` with ``[i, j] = table[j - i + L - 1]``."""
    if torch.jit.is_tracing():
        return table[offset_index(length, table.device).t()]
    return table.unfold(0, length, 1).flip(0).transpose(1, 2)


def resize_rel_table(table: Tensor, length: int) -> Tensor:
    """Resize a ``(2L-1, d)`` table of 1-D offsets ``-(L-1)..L-1`` to ``(2*length-1, d)``.

    Shorter: the central ``2*length-1`` offsets are kept unchanged (exact: a smaller map only ever uses
    those). Longer: linear interpolation along the offset axis (``align_corners=False``), the method of
    timm's and SAM's ``get_rel_pos``; offset 0 stays at the centre.
    """
    old = (table.shape[0] + 1) // 2
    if length == old:
        return table
    if length < old:
        return table[old - length : old + length - 1]
    resized = F.interpolate(table.t().unsqueeze(0), size=2 * length - 1, mode="linear", align_corners=False)
    return resized.squeeze(0).t()


# Under torch.fx symbolic tracing the map size is a proxy: the crop-or-interpolate choice runs as one call in
# the graph, with the actual size, instead of being traced.
torch.fx.wrap("resize_rel_table")


class FlatRelPosEmbed(nn.Module):
    """Relative embedding over raster-flattened offsets (official ``pe_type='classification'``).

    One parameter ``relative`` of shape ``(2*qk_dim + v_dim, 2K-1)``, ``K = H*W``, split into query, key
    and value parts. For query ``i`` and key ``j`` the logits gain ``q_i . r_q[i - j]`` and
    ``k_j . r_k[j - i]`` and the output gains ``sum_j p_ij r_v[i - j]``.
    """

    @takes_factory_kwargs
    def __init__(self, qk_dim: int, v_dim: int, feature_size: Size2d) -> None:
        """Raises :class:`~lesa.errors.ConfigError` for dimensions or a ``feature_size`` that are not ints >= 1."""
        super().__init__()
        self.qk_dim, self.v_dim = check_int("qk_dim", qk_dim), check_int("v_dim", v_dim)
        self.feature_size = check_size2d("feature_size", feature_size, FEATURE_SIZE_HINT)
        length = self.feature_size[0] * self.feature_size[1]
        self.relative = nn.Parameter(torch.empty(2 * qk_dim + v_dim, 2 * length - 1))
        self.reset_parameters()

    @property
    def length(self) -> int:
        return self.feature_size[0] * self.feature_size[1]

    def reset_parameters(self) -> None:
        nn.init.normal_(self.relative, 0.0, math.sqrt(1.0 / self.v_dim))

    def check_size(self, height: int, width: int) -> None:
        if (height, width) != self.feature_size:
            raise ConfigError(
                f"pos_embed='flat' was built for {self.feature_size[0]}x{self.feature_size[1]} feature maps "
                f"but got {height}x{width}: its table is indexed by raster-flattened offsets and cannot be "
                "resized. Build the layer/model for this size (feature_size=... or img_size=...), or use "
                "pos_embed='rel2d', which works at any size."
            )

    def assert_size(self, height: int, width: int) -> None:
        """:meth:`check_size` for TorchScript and torch.fx graphs (``torch._assert``; the message names the fix)."""
        torch._assert((height == self.feature_size[0]) & (width == self.feature_size[1]),
                      "pos_embed='flat' got a feature map of another size than the one it was built for: build "
                      "the model for this input size (img_size=...), or use pos_embed='rel2d' (any size)")

    def tables(self) -> tuple[Tensor, Tensor, Tensor]:
        """The query, key and value tables, each ``(dim, 2K-1)``."""
        parts = torch.split(self.relative, [self.qk_dim, self.qk_dim, self.v_dim], dim=0)
        return parts[0], parts[1], parts[2]

    def reference_logits(self, q: Tensor, k: Tensor, height: int, width: int) -> list[Tensor]:
        """The position terms of the materialised ``(N, G, P, P)`` logits: ``q_i . r_q[i - j]`` and
        ``k_j . r_k[j - i]``."""
        num = q.shape[-2]
        tq, tk, _ = self.tables()
        return [torch.einsum("ngid,dij->ngij", q, toeplitz_expand(tq, num).to(q.dtype)),
                torch.einsum("ngjd,dji->ngij", k, toeplitz_expand(tk, num).to(k.dtype))]

    def reference_values(self, attn: Tensor) -> Optional[Tensor]:
        """``sum_j p_ij r_v[i - j]`` from the materialised attention ``(N, G, P, P)``."""
        _, _, tv = self.tables()
        return torch.einsum("ngij,dij->ngid", attn, toeplitz_expand(tv, attn.shape[-2]).to(attn.dtype))

    def extra_repr(self) -> str:
        return f"qk_dim={self.qk_dim}, v_dim={self.v_dim}, feature_size={self.feature_size}"


class RelPosEmbed2d(nn.Module):
    """Separate height/width relative embeddings (official ``pe_type='detection_qr'``).

    ``height``: ``(2H-1, dim)``, ``width``: ``(2W-1, dim)`` for the feature size the layer was built for.
    At run time :meth:`tables_for` crops or interpolates them to the actual map size.
    """

    @takes_factory_kwargs
    def __init__(self, dim: int, feature_size: Size2d) -> None:
        """Raises :class:`~lesa.errors.ConfigError` for a ``dim`` or ``feature_size`` that is not ints >= 1."""
        super().__init__()
        self.dim = check_int("dim", dim)
        self.feature_size = check_size2d("feature_size", feature_size, FEATURE_SIZE_HINT)
        h, w = self.feature_size
        self.height = nn.Parameter(torch.empty(2 * h - 1, dim))
        self.width = nn.Parameter(torch.empty(2 * w - 1, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        scale = self.dim**-0.5
        nn.init.normal_(self.height, 0.0, scale)
        nn.init.normal_(self.width, 0.0, scale)

    def check_size(self, height: int, width: int) -> None:  # any size works
        return None

    def assert_size(self, height: int, width: int) -> None:
        return None

    def tables_for(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        """``(H, H, dim)`` and ``(W, W, dim)`` tables indexed ``[query, key]`` for an ``height x width`` map."""
        rh = resize_rel_table(self.height, height)
        rw = resize_rel_table(self.width, width)
        return abs_from_rel(rh, height), abs_from_rel(rw, width)

    def rel_logits(self, q: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Per-query logits against every key row and column.

        ``q``: ``(..., H*W, dim)``. Returns ``(..., H*W, H)`` and ``(..., H*W, W)``: entry ``[i, y]`` is
        ``q_i . r_h[y - y_i]`` and entry ``[i, x]`` is ``q_i . r_w[x - x_i]``. The full logit of key ``j``
        is their sum at ``(y_j, x_j)``.
        """
        rh, rw = self.tables_for(height, width)
        q2 = q.unflatten(-2, [height, width])
        logits_h = torch.einsum("...yxd,ykd->...yxk", q2, rh.to(q.dtype))
        logits_w = torch.einsum("...yxd,xkd->...yxk", q2, rw.to(q.dtype))
        return logits_h.flatten(-3, -2), logits_w.flatten(-3, -2)

    def reference_logits(self, q: Tensor, k: Tensor, height: int, width: int) -> list[Tensor]:
        """The position term of the materialised ``(N, G, HW, HW)`` logits: ``rows_i[y_j] + cols_i[x_j]``."""
        rows, cols = self.rel_logits(q, height, width)
        return [(rows.unsqueeze(-1) + cols.unsqueeze(-2)).flatten(-2)]

    def reference_values(self, attn: Tensor) -> Optional[Tensor]:
        return None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, feature_size={self.feature_size}"
