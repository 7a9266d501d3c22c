"""The ``livekv`` attention function, registered with transformers' ``AttentionInterface``.

Modeling code calls ``past_key_values.update(k, v, layer_idx)`` and then the attention function. A livekv cache
layer's ``update`` stores the new keys/values and leaves itself as the *pending* layer; the attention function
picks it up and lets it attend (dense, or over the tokens its method selects). Without a livekv cache (no cache,
or another Cache class) the call falls through to transformers' SDPA attention, so a model set to ``livekv``
behaves exactly like ``sdpa`` until it is given a ``LiveKVCache``.

The mask function registered beside it is transformers' SDPA mask: it builds the (logical-position) mask only
when padding requires one, and the layer gathers the columns of the tokens it reads. Before it, the cache checks
the 2-D attention mask: it must cover exactly the cached tokens and the new ones (an input that does not continue
the cached sequence is refused), and sparse methods refuse padded batches.
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


NOT_LIVEKV = (
    "the model's attention did not run through livekv: a LiveKVCache (or a stream session) needs attention "
    "implementation 'livekv'. Call model.set_attn_implementation('livekv') (or load the model with "
    "attn_implementation='livekv', as livekv.load_model does), then start again with a fresh cache. A model whose "
    "attention does not go through transformers' AttentionInterface (e.g. bloom, falcon, mpt) cannot run livekv"
)


def set_pending(layer) -> None:
    """Hand ``layer`` to the attention function that runs next. A layer still pending means the previous layer's
    attention did not go through livekv's function (the model is not set to ``livekv``): its result was wrong."""
    if getattr(_pending, "layer", None) is not None:
        _pending.layer = None
        raise RuntimeError(NOT_LIVEKV)
    _pending.layer = layer


def check_not_pending() -> None:
    """At the start of a forward: no layer may still wait for its attention (see ``set_pending``)."""
    if getattr(_pending, "layer", None) is not None:
        _pending.layer = None
        raise RuntimeError(NOT_LIVEKV)


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
    for name in ("softcap", "s_aux", "sinks"):  # logit soft-capping (Gemma 2), attention sinks (gpt-oss)
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"livekv attention does not support {name!r} (this model's attention uses it)")
    if dropout and module.training:
        raise NotImplementedError("livekv attention is for inference; it has no dropout")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if module.layer_idx == 0:
        padded, _pending.padded = getattr(_pending, "padded", None), None  # this forward's (a user's 4-D mask: none)
        if attention_mask is None or padded is False:
            layer.check_positions(kwargs.get("position_ids"))  # with padding, positions lag the tokens held
    return layer.attend(query, key, value, attention_mask, scaling), None


def set_mask_cache(cache) -> None:
    """The cache whose forward builds the next mask (``livekv_mask`` checks the mask against it, and notes
    whether it pads: ``None`` until it has run)."""
    _pending.mask_cache, _pending.padded = cache, None


def livekv_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """Transformers' SDPA mask, after the cache of this forward checked the 2-D ``attention_mask [B, kv_length]``
    (it must cover exactly the cached tokens and the new ones)."""
    cache = getattr(_pending, "mask_cache", None)
    _pending.mask_cache = None
    if cache is not None and attention_mask is not None and attention_mask.ndim == 2:
        cache.check_attention_mask(attention_mask, kwargs["kv_length"])
    plain = attention_mask is None or (attention_mask.ndim == 2 and bool(attention_mask.all()))
    _pending.padded = None if attention_mask is not None and attention_mask.ndim != 2 else not plain
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, livekv_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, livekv_mask)
