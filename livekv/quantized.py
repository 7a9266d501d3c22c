"""A quantized host tier: keys and values kept in 8 or 4 bits with per-group scales (as KIVI does), dequantized into
the KV's dtype when recalled.

Keys are quantized per channel over groups of ``group`` tokens (KIVI's 32, rounded up to a multiple of the page
size), values per token over the head dim: asymmetric min/max, round to nearest, 4-bit codes packed two per byte.
Scale and zero point are float16, rounded outward so that the group's ``[min, max]`` stays inside the range its codes
span: every element comes back within half a step (its group's scale / 2) of what was stored, up to float32
rounding. Values beyond float16's range (65504) are clipped. The tokens after the last full key group (fewer than
``group``) stay exact in a residual buffer (KIVI's residual) and are quantized when their group fills.

Page digests (min/max keys) are computed from the exact keys when they are appended, so Quest-style page selection
is the same as over the exact tier; only what the selected tokens hold changes. (A selector that reads keys back
from the store, as ClusterKV's clustering does, sees the dequantized ones. A fast tier that keeps what it recalled
across steps, FreeKV's page slots and ClusterKV's resident tokens, keeps a token recalled while it was still exact
until it is evicted: what those methods read then depends on when a token was recalled, by up to half a step.)

Layout, with tokens ``[0, quantized)`` quantized, ``quantized = length // group * group``, r = group // p pages per
key group, Dc = D * bits // 8 bytes of codes per token:

* ``pages [B, P, G, 2, p, Dc]`` uint8 codes of keys and values (the ``HostStore`` layout: the disk tier maps them
  unchanged);
* ``key_scales [B, P / r, G, 2, D]`` float16: scale and zero point of each key group and channel;
* ``value_scales [B, P, G, 2, p]`` float16: scale and zero point of each token's value;
* ``residual [B, G, 2, group, D]`` in the KV's dtype: keys and values of tokens ``[quantized, length)``.
"""

from __future__ import annotations

import torch

from livekv.store import HostStore
from livekv.tensors import grow

QUANT_GROUP = 32  # tokens per key group (KIVI)
ROW = 1 << 40  # rows(): (b * G + g) * ROW + token


def affine(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float16 scale and zero point of groups with minimum ``lo`` and maximum ``hi`` (same shapes), rounded outward
    so that ``[lo, hi]`` lies in ``[zero, zero + scale * (2^bits - 1)]``."""
    levels, big = 2**bits - 1, torch.finfo(torch.float16).max
    lo, hi = lo.float().clamp(-big, big), hi.float().clamp(-big, big)
    zero = lo.to(torch.float16)
    zero = torch.where(zero.float() > lo, zero.nextafter(zero.new_tensor(-big)), zero)
    scale = ((hi - zero.float()) / levels).to(torch.float16).clamp(min=torch.finfo(torch.float16).tiny)
    scale = torch.where(scale.float() * levels + zero.float() < hi, scale.nextafter(scale.new_tensor(big)), scale)
    return scale, zero


def encode(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``x [..., D]`` -> uint8 codes ``[..., D * bits // 8]`` (scale and zero broadcast against ``x``)."""
    q = ((x.float() - zero.float()) / scale.float()).round_().clamp_(0, 2**bits - 1).to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4) if bits == 4 else q


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Codes ``[..., Dc]`` -> ``[..., D]`` in ``dtype`` (scale and zero broadcast against the result)."""
    if bits == 4:
        codes = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)
    return (codes.float() * scale.float() + zero.float()).to(dtype)


class QuantHostStore(HostStore):
    """A ``HostStore`` whose tokens are kept in ``bits`` (8 or 4) bits; same API, recall dequantizes (see the
    module docstring for the layout and the error bound)."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype,
                 device: torch.device, digests: bool = True, *, bits: int, **kwargs):
        if bits not in (8, 4):
            raise ValueError(f"a quantized host tier has 8 or 4 bits, got {bits}")
        if bits == 4 and head_dim % 2:
            raise ValueError(f"4-bit codes pack two channels a byte: head_dim must be even, got {head_dim}")
        self.bits = bits
        self.group = -(-QUANT_GROUP // page_size) * page_size
        self.quantized = 0
        self.key_scales = torch.empty(batch, 0, kv_heads, 2, head_dim, dtype=torch.float16)
        self.value_scales = torch.empty(batch, 0, kv_heads, 2, page_size, dtype=torch.float16)
        self.residual = torch.zeros(batch, kv_heads, 2, self.group, head_dim, dtype=dtype)
        super().__init__(batch, kv_heads, head_dim, page_size, dtype, device, digests, **kwargs)

    def _empty_pages(self, batch: int, kv_heads: int, pin: bool) -> torch.Tensor:
        codes = self.head_dim * self.bits // 8
        return torch.empty(batch, 0, kv_heads, 2, self.page_size, codes, dtype=torch.uint8, pin_memory=pin)

    def _reserve_pages(self, n: int) -> None:
        super()._reserve_pages(n)
        self.value_scales = grow(self.value_scales, 1, n)
        self.key_scales = grow(self.key_scales, 1, -(-n * self.page_size // self.group))

    @property
    def token_bytes(self) -> int:
        """Host-tier bytes of one quantized token's key and value of one KV head: codes, the value's scale and zero,
        and its share of its key group's (rounded up)."""
        return 2 * self.pages.shape[-1] + 4 + -(-4 * self.head_dim // self.group)

    # --- appending ------------------------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v [B, G, n, D]``: digests from the exact keys, full key groups quantized, the rest kept exact."""
        self._check_shapes(k, v)
        start, end, q = self.length, self.length + k.shape[2], self.quantized
        keys = torch.cat((self.residual[:, :, 0, : start - q], k.cpu()), dim=2)  # exact tokens [q, end)
        values = torch.cat((self.residual[:, :, 1, : start - q], v.cpu()), dim=2)
        self.length = end
        p = self.page_size
        first, last = start // p, end // p
        if self.track_digests and last > first:
            full = keys[:, :, first * p - q : last * p - q]  # [B, G, n * p, D]
            self._set_digests(first, full.unflatten(2, (-1, p)).transpose(1, 2))
        n = (end - q) // self.group * self.group
        if n:
            self._quantize(keys[:, :, :n], values[:, :, :n])
        self.residual[:, :, 0, : end - q - n] = keys[:, :, n:]
        self.residual[:, :, 1, : end - q - n] = values[:, :, n:]

    def _quantize(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize tokens ``[quantized, quantized + n)``: keys and values ``[B, G, n, D]``, n a multiple of
        ``group``."""
        B, G, n, D = keys.shape
        p, bits = self.page_size, self.bits
        first, n_pages = self.quantized // p, n // p
        self._reserve_pages(first + n_pages)
        groups = keys.unflatten(2, (-1, self.group))  # [B, G, n_groups, group, D]
        k_scale, k_zero = affine(groups.amin(3, keepdim=True), groups.amax(3, keepdim=True), bits)
        v_scale, v_zero = affine(values.amin(3, keepdim=True), values.amax(3, keepdim=True), bits)
        k_codes = encode(groups, k_scale, k_zero, bits).view(B, G, n_pages, p, -1)
        v_codes = encode(values, v_scale, v_zero, bits).view(B, G, n_pages, p, -1)
        self.pages[:, first : first + n_pages] = torch.stack((k_codes, v_codes), dim=3).transpose(1, 2)
        g0 = self.quantized // self.group
        self.key_scales[:, g0 : g0 + n // self.group] = torch.cat((k_scale, k_zero), dim=3).transpose(1, 2)
        v_sz = torch.cat((v_scale, v_zero), dim=3).view(B, G, n_pages, p, 2)  # [B, G, pages, p, (scale, zero)]
        self.value_scales[:, first : first + n_pages] = v_sz.permute(0, 2, 1, 4, 3)
        self.quantized += n

    # --- recall ---------------------------------------------------------------------------------------------------
    def rows(self, b: torch.Tensor, g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Opaque row numbers of tokens ``t`` of (batch ``b``, KV head ``g``) for ``gather_rows`` (broadcasting)."""
        return (b * self.kv_heads + g) * ROW + t

    def gather_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[*rows.shape, D]`` at ``rows`` (from ``rows()``), dequantized, on the CPU."""
        flat = rows.cpu().reshape(-1)
        bg, t = flat // ROW, flat % ROW
        k, v = self._tokens(bg // self.kv_heads, bg % self.kv_heads, t)
        return k.view(*rows.shape, -1), v.view(*rows.shape, -1)

    def _tokens(self, b: torch.Tensor, g: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[n, D]`` of tokens ``(b, g, t) [n]``: dequantized, or from the residual."""
        k = torch.empty(len(t), self.head_dim, dtype=self.dtype)
        v = torch.empty_like(k)
        q = t < self.quantized
        if bool(q.any()):
            bq, gq, tq = b[q], g[q], t[q]
            page, offset = tq // self.page_size, tq % self.page_size
            codes = self.pages[bq, page, gq, :, offset]  # [m, 2, Dc]
            ks = self.key_scales[bq, tq // self.group, gq]  # [m, 2, D]
            vs = self.value_scales[bq, page, gq, :, offset]  # [m, 2]
            k[q] = decode(codes[:, 0], ks[:, 0], ks[:, 1], self.bits, self.dtype)
            v[q] = decode(codes[:, 1], vs[:, :1], vs[:, 1:], self.bits, self.dtype)
        r = ~q
        if bool(r.any()):
            res = self.residual[b[r], g[r], :, t[r] - self.quantized]  # [m, 2, D]
            k[r], v[r] = res[:, 0], res[:, 1]
        return k, v

    def blocks(self, b: torch.Tensor, g: torch.Tensor, page: torch.Tensor, out: torch.Tensor | None = None):
        """The ``(b, g, page) [n]`` blocks as keys and values ``[n, 2, p, D]``, dequantized (into ``out`` if given)."""
        p, D = self.page_size, self.head_dim
        out = torch.empty(len(page), 2, p, D, dtype=self.dtype) if out is None else out
        first_exact = self.quantized // p
        q = page < first_exact
        if bool(q.any()):
            bq, gq, pq = b[q], g[q], page[q]
            codes = self.pages[bq, pq, gq]  # [m, 2, p, Dc]
            ks = self.key_scales[bq, pq * p // self.group, gq]  # [m, 2, D]
            vs = self.value_scales[bq, pq, gq]  # [m, 2, p]
            out[q, 0] = decode(codes[:, 0], ks[:, :1], ks[:, 1:], self.bits, self.dtype)
            out[q, 1] = decode(codes[:, 1], vs[:, 0, :, None], vs[:, 1, :, None], self.bits, self.dtype)
        r = ~q
        if bool(r.any()):
            res = self.residual.unflatten(3, (-1, p))  # [B, G, 2, group / p, p, D]
            out[r] = res[b[r], g[r], :, page[r] - first_exact]
        return out

    def all_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored token, keys and values ``[B, G, T, D]`` in the KV's dtype, on the compute device."""
        B, G, D, q = self.batch, self.kv_heads, self.head_dim, self.quantized
        rest = self.residual[:, :, :, : self.length - q]
        if q == 0:  # nothing quantized yet (fewer tokens than a key group)
            return rest[:, :, 0].to(self.device, non_blocking=True), rest[:, :, 1].to(self.device, non_blocking=True)
        n_pages, n_groups = q // self.page_size, q // self.group
        codes = self.pages[:, :n_pages].permute(0, 2, 3, 1, 4, 5).reshape(B, G, 2, q, -1)
        ks = self.key_scales[:, :n_groups].permute(0, 2, 3, 1, 4).unsqueeze(4)  # [B, G, 2, n_groups, 1, D]
        vs = self.value_scales[:, :n_pages].permute(0, 2, 3, 1, 4).reshape(B, G, 2, q, 1)
        keys = decode(codes[:, :, 0].unflatten(2, (n_groups, -1)), ks[:, :, 0], ks[:, :, 1], self.bits, self.dtype)
        values = decode(codes[:, :, 1], vs[:, :, 0], vs[:, :, 1], self.bits, self.dtype)
        keys = torch.cat((keys.view(B, G, q, D), rest[:, :, 0]), dim=2)
        values = torch.cat((values, rest[:, :, 1]), dim=2)
        return keys.to(self.device, non_blocking=True), values.to(self.device, non_blocking=True)

    # --- beams, bytes, snapshots ----------------------------------------------------------------------------------
    def select_rows(self, rows: torch.Tensor) -> None:
        super().select_rows(rows)
        rows = rows.cpu()
        self.key_scales, self.value_scales, self.residual = (
            x.index_select(0, rows) for x in (self.key_scales, self.value_scales, self.residual))

    @property
    def nbytes(self) -> int:
        """Bytes allocated: codes, scales and zero points, residual."""
        return self.pages.nbytes + self.key_scales.nbytes + self.value_scales.nbytes + self.residual.nbytes

    @property
    def used(self) -> int:
        """Bytes of the stored tokens: codes, scales and zero points of the quantized ones, the exact residual."""
        q, B, G, D = self.quantized, self.batch, self.kv_heads, self.head_dim
        codes = B * G * q * 2 * self.pages.shape[-1]
        scales = B * G * (q // self.group) * 2 * D * 2 + B * G * q * 2 * 2
        return codes + scales + B * G * 2 * D * self.residual.element_size() * (self.length - q)

    def state(self) -> dict[str, torch.Tensor]:
        """Codes, scales and zero points of the quantized tokens, the residual and the full pages' digests."""
        q, p = self.quantized, self.page_size
        out = super().state()
        out.update(pages=self.pages[:, : q // p], key_scales=self.key_scales[:, : q // self.group],
                   value_scales=self.value_scales[:, : q // p], residual=self.residual[:, :, :, : self.length - q])
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], length: int) -> None:
        if "residual" not in tensors or tensors["pages"].shape[-1] != self.pages.shape[-1]:
            raise ValueError(f"this snapshot's host tier is not quantized in {self.bits} bits")
        super().load_state(tensors, length)
        self.quantized = length // self.group * self.group
        n_groups, n_pages = self.quantized // self.group, self.quantized // self.page_size
        self.key_scales[:, :n_groups] = tensors["key_scales"]
        self.value_scales[:, :n_pages] = tensors["value_scales"]
        self.residual[:, :, :, : length - self.quantized] = tensors["residual"]
