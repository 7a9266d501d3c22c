"""The ``livekv`` attention function, registered with transformers' ``AttentionInterface``.

Modeling code calls ``past_key_values.update(k, v, layer_idx)`` and then the attention function. A livekv cache
layer's ``update`` stores the new keys/values and leaves itself as the *pending* layer; the attention function
picks it up and lets it attend (dense, or over the tokens its method selects). Without a livekv cache (no cache,
or another Cache class) the call falls through to transformers' SDPA attention, so a model set to ``livekv``
behaves exactly like ``sdpa`` until it is given a ``LiveKVCache``.

The mask function registered beside it is transformers' SDPA mask: it builds the (logical-position) mask only
when padding requires one, and the layer gathers the columns of the tokens it reads.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "livekv"

_pending = threading.local()


def set_pending(layer) -> None:
    _pending.layer = layer


def _take_pending(layer_idx: int):
    layer = getattr(_pending, "layer", None)
    _pending.layer = None
    if layer is not None and layer.layer_idx != layer_idx:
        raise RuntimeError(f"livekv: cache layer {layer.layer_idx} was updated but attention runs in layer {layer_idx}")
    return layer


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal GQA attention of the newest ``n`` queries over ``L`` keys (the queries are the last ``n`` positions).

    query ``[B, H, n, D]``; keys, values ``[B, G, L, D]``; mask ``None`` (causal) or bool ``[B, 1|G, n, L]``
    (True = attend). Returns ``[B, n, H, D]``, the layout transformers' attention functions return.
    """
    B, H, n, D = query.shape
    G, L = keys.shape[1], keys.shape[2]
    if n == 1:
        # Fold the group's query heads into the query axis: no repeat of K/V, one matmul per KV head.
        q = query.view(B, G, H // G, D)
        if mask is not None:
            mask = mask.expand(B, G, 1, L)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
        return out.reshape(B, H, 1, D).transpose(1, 2)
    if mask is None and L > n:
        mask = torch.ones(n, L, dtype=torch.bool, device=query.device).tril(L - n)
    out = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=H != G
    )
    return out.transpose(1, 2)


def livekv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    layer = _take_pending(module.layer_idx)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("sliding_window"):
        raise NotImplementedError("livekv does not support sliding-window attention layers")
    if dropout and module.training:
        raise NotImplementedError("livekv attention is for inference; it has no dropout")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    return layer.attend(query, key, value, attention_mask, scaling), None


AttentionInterface.register(ATTN_IMPLEMENTATION, livekv_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
