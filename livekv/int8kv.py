"""A dense fast tier in int8 (``dense:kv_bits=8``) and decode attention that reads its codes directly.

Keys and values are quantized per token and KV head (symmetric, a bfloat16 scale each; ``retrieval.Int8Rows``).
On a CPU a decode step runs torch's int8 weight-only kernel (``_weight_int8pack_mm``, ``x @ W^T`` with W int8
rows and a scale per row) twice per (batch, KV head): ``q . k`` with the key codes ``[T, D]`` as W, then
``p @ v`` with the value codes stored transposed, ``[D, capacity]``, as W and their scales folded into ``p``.
Capacity grows in multiples of 64 tokens (the kernel needs its inner dimension a multiple of 16); value codes
past the valid tokens stay 0, so the second product runs over the whole capacity with zero weights there.
Everything else (prefill, padding masks, other devices) dequantizes and runs ``attention.attend``: the reference
the kernel path is tested against. Shapes: B batch, G KV heads, H query heads, r = H / G, T tokens, D head dim.
"""

from __future__ import annotations

import torch

from livekv.attention import attend
from livekv.retrieval import Int8Rows
from livekv.tensors import capacity_for, grow

KEYS = ("key_codes", "key_scales", "value_codes", "value_scales")


class Int8KV:
    """A growable int8 key/value buffer ``[B, G, capacity, D]`` (values kept transposed); ``length`` tokens are
    valid. ``dtype`` is what attention returns and ``dequantize`` gives."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.keys = Int8Rows(torch.zeros(batch, kv_heads, 0, head_dim, dtype=torch.int8, device=device),
                             torch.zeros(batch, kv_heads, 0, dtype=torch.bfloat16, device=device))
        self.values_t = torch.zeros(batch, kv_heads, head_dim, 0, dtype=torch.int8, device=device)
        self.value_scales = torch.zeros(batch, kv_heads, 0, dtype=torch.bfloat16, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.values_t.shape[-1]

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        cap = capacity_for(needed, self.capacity, 64)
        self.keys = self.keys.grow(cap)
        self.values_t, self.value_scales = grow(self.values_t, 3, cap), grow(self.value_scales, 2, cap)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize and append ``k, v [B, G, n, D]`` after the valid tokens."""
        start, end = self.length, self.length + k.shape[2]
        self._reserve(end)
        key, value = Int8Rows.encode(k.float()), Int8Rows.encode(v.float())
        self.keys.codes[:, :, start:end], self.keys.scales[:, :, start:end] = key.codes, key.scales
        self.values_t[..., start:end], self.value_scales[..., start:end] = value.codes.transpose(2, 3), value.scales
        self.length = end

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid keys and values in ``dtype``, ``[B, G, T, D]`` each."""
        T = self.length
        keys = self.keys[:, :, :T].float().to(self.dtype)
        values = self.values_t[..., :T].transpose(2, 3).contiguous().float() * self.value_scales[:, :, :T, None].float()
        return keys, values.to(self.dtype)

    def attend(self, query: torch.Tensor, scaling: float, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of ``query [B, H, n, D]`` (the newest n positions) over the buffer -> ``[B, n, H, D]``; mask as
        in ``attention.attend``."""
        n, D = query.shape[2], query.shape[3]
        if n > 1 or mask is not None or query.device.type != "cpu" or D % 16:
            return attend(query, *self.dequantize(), scaling, mask)
        return self._decode(query, scaling)

    def _decode(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        B, H, _, D = query.shape
        G, T = self.keys.shape[1], self.length
        mm = torch.ops.aten._weight_int8pack_mm
        q = (query.reshape(B, G, H // G, D) * scaling).bfloat16()
        scores = torch.stack([mm(q[b, g], self.keys.codes[b, g, :T], self.keys.scales[b, g, :T])
                              for b in range(B) for g in range(G)]).view(B, G, H // G, T)
        weights = q.new_zeros(B, G, H // G, self.capacity)  # bfloat16; zero past the valid tokens
        torch.mul(scores.float().softmax(-1), self.value_scales[:, :, None, :T], out=weights[..., :T])
        ones = q.new_ones(D)
        out = torch.stack([mm(weights[b, g], self.values_t[b, g], ones) for b in range(B) for g in range(G)])
        return out.view(B, 1, H, D).to(query.dtype)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Row ``b`` becomes row ``rows[b]`` (beam search)."""
        rows = rows.to(self.values_t.device)
        self.keys = self.keys.index_select(0, rows)
        self.values_t, self.value_scales = self.values_t.index_select(0, rows), self.value_scales.index_select(0, rows)

    @property
    def nbytes(self) -> int:
        """Bytes allocated (the capacity)."""
        return self.keys.nbytes + self.values_t.nbytes + self.value_scales.nbytes

    @property
    def used(self) -> int:
        """Bytes of the valid tokens."""
        return self.nbytes * self.length // max(1, self.capacity)

    def state(self) -> dict[str, torch.Tensor]:
        T = self.length
        return dict(zip(KEYS, (self.keys.codes[:, :, :T].contiguous(), self.keys.scales[:, :, :T].contiguous(),
                               self.values_t[..., :T].contiguous(), self.value_scales[:, :, :T].contiguous())))

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                   device: torch.device | str = "cpu") -> Int8KV:
        codes, key_scales, values_t, value_scales = (tensors[k].to(device) for k in KEYS)
        B, G, T, D = codes.shape
        buf = cls(B, G, D, dtype, torch.device(device))
        buf._reserve(T)
        buf.keys.codes[:, :, :T], buf.keys.scales[:, :, :T] = codes, key_scales
        buf.values_t[..., :T], buf.value_scales[:, :, :T] = values_t, value_scales
        buf.length = T
        return buf
