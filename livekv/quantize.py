"""Weight-only quantization of a model's ``nn.Linear`` layers (its ``lm_head`` too), so that a decode step reads
fewer bytes of weights. Activations keep the model's dtype outside each layer.

``int8``: symmetric, one scale per output channel, multiplied by ``torch.ops.aten._weight_int8pack_mm`` (the CPU
kernel gpt-fast uses). ``int4``: asymmetric, a scale and a zero per group of ``group_size`` input channels, packed
for ``torch.ops.aten._weight_int4pack_mm_for_cpu``. ``bfloat16``: the weights stored in bfloat16. The three compute
in bfloat16 inside: on torch 2.13's CPU the int8 kernel is ~4x slower than a float32 GEMV when given float32
activations, and ~2.7x faster when given bfloat16 ones; the int4 kernel likewise. The embedding is left as it is:
a tied ``lm_head`` becomes a quantized copy and the input embedding keeps its float weight for the lookup.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = ("float32", "bfloat16", "int8", "int4")
KERNELS = {"int8": ("_weight_int8pack_mm",),
           "int4": ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")}
PREFILL_ROWS = 128  # from this many rows at once, int8 dequantizes and multiplies in the activations' dtype


class Int8Linear(nn.Module):
    """``y = x @ (qweight * scales[:, None])^T + bias``: ``qweight [out, in]`` int8, ``scales [out]`` bfloat16 (the
    largest ``|w|`` of the row over 127). ``x [..., in]`` -> ``y [..., out]``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).bfloat16()  # the kernel takes the activations' dtype
        self.register_buffer("qweight", (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight these layers multiply by, ``[out, in]``."""
        return (self.qweight.float() * self.scales.float()[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] >= PREFILL_ROWS:  # a prefill chunk: the kernel is ~2x slower than a plain GEMM there
            return F.linear(x, self.dequantized(x.dtype), self.bias)
        y = torch.ops.aten._weight_int8pack_mm(rows.bfloat16().contiguous(), self.qweight, self.scales)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """4-bit weights in groups of ``group_size`` input channels: ``w = (q - 8) * scale + zero`` with ``q`` in 0..15,
    ``scale`` and ``zero`` per output channel and group. ``qweight``: ``q [out, in]`` packed by torch (uint8);
    ``scales_and_zeros [in / group_size, out, 2]`` bfloat16. ``x [..., in]`` -> ``y [..., out]``."""

    def __init__(self, linear: nn.Linear, group_size: int = 32):
        super().__init__()
        n, k = linear.weight.shape
        if k % group_size:
            raise ValueError(f"int4 needs in_features ({k}) to be a multiple of the group size ({group_size})")
        if n % 16:  # torch's int4 packing takes rows 16 at a time
            raise ValueError(f"int4 needs out_features ({n}) to be a multiple of 16")
        w = linear.weight.detach().float().reshape(n, k // group_size, group_size)
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-8).bfloat16().float()  # rounded as the kernel will read them
        zero = (low + 8 * scale).bfloat16().float()
        q = ((w - zero) / scale + 8).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
        scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1)  # [in / group_size, out, 2]
        self.register_buffer("scales_and_zeros", scales_and_zeros.bfloat16().contiguous())
        self.bias, self.group_size = linear.bias, group_size
        self.in_features, self.out_features = k, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).bfloat16().contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.qweight, self.group_size, self.scales_and_zeros)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


class BF16Linear(nn.Module):
    """``weight [out, in]`` stored in bfloat16 and multiplied in bfloat16. ``x [..., in]`` -> ``y [..., out]``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("qweight", linear.weight.detach().bfloat16())
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.bfloat16()
        return F.linear(x.bfloat16(), self.qweight, bias).to(x.dtype)


def check_weights(weights: str) -> None:
    """A ValueError for a kind not in ``WEIGHTS`` or one whose kernels this torch lacks."""
    if weights not in WEIGHTS:
        raise ValueError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    missing = [name for name in KERNELS.get(weights, ()) if not hasattr(torch.ops.aten, name)]
    if missing:
        raise ValueError(f"--weights {weights} needs torch.ops.aten.{', '.join(missing)}, which torch "
                           f"{torch.__version__} lacks (torch >= 2.6 has it)")


def quantize_weights(model: nn.Module, weights: str = "int8", group_size: int = 32) -> nn.Module:
    """Every ``nn.Linear`` of ``model`` replaced by its ``weights`` form (one of ``WEIGHTS``; ``float32``: left as
    it is), in place; returns ``model``. ``group_size``: int4's; 32 measured on the embedded SmolLM2 (itself
    dequantized from 4 bits in blocks of 32): top-1 agreement with float32 0.83 against 0.59 for 64, as fast. The quantized layers hold buffers named ``qweight``, not ``weight``, so that
    re-tying the embeddings cannot slip a float weight into them. int8 and int4 run on the CPU only."""
    check_weights(weights)
    if weights == "float32":
        return model
    make = {"int8": Int8Linear, "int4": lambda lin: Int4Linear(lin, group_size), "bfloat16": BF16Linear}[weights]
    replaced = []  # every layer made first, then swapped in: a layer refused (ValueError) leaves the model as it was
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                if weights in KERNELS and child.weight.device.type != "cpu":
                    raise ValueError(f"--weights {weights} runs on the CPU only (torch's CPU kernels); "
                                     f"{name} is on {child.weight.device}")
                try:
                    replaced.append((parent, name, make(child)))
                except ValueError as e:
                    raise ValueError(f"--weights {weights}: {name}: {e}") from None
    for parent, name, layer in replaced:
        setattr(parent, name, layer)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights a decode step reads: every leaf module's parameters and buffers (the linear layers, the
    norms), but one row of each embedding."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            total += module.weight[0].nbytes
        elif not list(module.children()):
            total += sum(t.nbytes for t in module.parameters(recurse=False))
            total += sum(t.nbytes for t in module.buffers(recurse=False))
    return total
