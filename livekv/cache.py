"""``LiveKVCache``: a transformers ``Cache`` whose layers (``livekv.layers``) own a tiered KV store.

Pass it as ``past_key_values`` to ``model(...)`` or ``model.generate(...)`` of a model whose attention
implementation is ``"livekv"`` (see ``livekv.attention``). Its method (``livekv.methods``) builds each layer:
dense, or recallable with the method's selector.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from transformers.cache_utils import Cache

from livekv import snapshot
from livekv.attention import check_not_pending, set_mask_cache
from livekv.layers import ONE_SEQUENCE, RecallableLayer
from livekv.protocol import LayerStats, Memory
from livekv.methods import MethodConfig, make_method


class LiveKVCache(Cache):
    """A KV cache whose sparse layers recall a query-dependent subset of the KV for each decode step.

    Args:
        config: the model's config (its text config is used).
        method: a registered method name (``dense``, ``sink_window``, ``quest``, ...) or its config.
        **knobs: the method's knobs (``budget``, ``sink``, ``window``, ``page_size``, ``dense_layers``, ...).

    Example::

        cache = LiveKVCache(model.config, "quest", budget=256)
        model.generate(input_ids, past_key_values=cache, max_new_tokens=32)
        cache.save("snap", model)                     # and later, with the same model:
        cache = LiveKVCache.load("snap", model)
    """

    def __init__(self, config, method: str | MethodConfig = "quest", **knobs):
        self.method = make_method(method, context="text", **knobs)
        n_layers = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[self.method.make_layer(i) for i in range(n_layers)])

    # --- checks the forward makes ------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.layers):
            raise ValueError(f"this cache has {len(self.layers)} layers and the model at least {layer_idx + 1}: "
                             "make the cache from this model's config")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """Asked once per forward, before any layer runs: the place to check the previous forward ended well and
        to let the mask function check this forward's attention mask against the cache."""
        check_not_pending()
        if query_length < 1:
            raise ValueError(f"no new tokens for a cache that holds {self.get_seq_length()}: the input does not "
                             f"continue the sequence it holds. {ONE_SEQUENCE}")
        set_mask_cache(self)
        return super().get_mask_sizes(query_length, layer_idx)

    def check_attention_mask(self, attention_mask: torch.Tensor, kv_length: int) -> None:
        """The 2-D ``attention_mask [B, L]`` of a forward that makes the sequence ``kv_length`` tokens long must
        cover exactly those tokens; sparse methods take no padding (they select tokens by position)."""
        cached = self.get_seq_length()
        if attention_mask.shape[-1] != kv_length:
            raise ValueError(f"the attention mask covers {attention_mask.shape[-1]} tokens, but the cache holds "
                             f"{cached} and the input adds {kv_length - cached}: the input does not continue the "
                             f"sequence this cache holds. {ONE_SEQUENCE}")
        if self.method.name != "dense" and not bool(attention_mask.all()):
            raise ValueError(f"padded batches are not supported by {self.method.name!r}: sparse methods select "
                             "tokens by position, and padding would take their places. Run the prompts one at a time "
                             "(or in batches of equal length), or use method 'dense'")

    # --- the whole cache ---------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything stored (same method and knobs): the cache can take an unrelated sequence."""
        self.wait()
        self.layers = [self.method.make_layer(i) for i in range(len(self.layers))]

    @property
    def recallable_layers(self) -> list[RecallableLayer]:
        return [layer for layer in self.layers if isinstance(layer, RecallableLayer)]

    def wait(self) -> None:
        """Finish every layer's background work (e.g. before stopping a clock)."""
        for layer in self.layers:
            layer.wait()

    def set_profile(self, on: bool = True) -> None:
        """Time selection and recall of every sparse step (synchronising the GPU; slows decoding slightly)."""
        for layer in self.recallable_layers:
            layer.profile = on

    def memory(self) -> dict[str, int]:
        """KV bytes per tier: ``*_kv_bytes`` used by the content (the same content gives the same bytes whatever
        the chunking), ``*_kv_reserved_bytes`` allocated. The fast tier counts what attention reads from (dense
        layers, recall buffers) and the selection's indexes (page digests, centroids). Read it between steps, on
        the thread that runs them (a server: its engine thread)."""
        total = sum((layer.memory() for layer in self.layers), Memory())
        return {"fast_kv_bytes": total.fast_used, "host_kv_bytes": total.host_used,
                "fast_kv_reserved_bytes": total.fast_reserved, "host_kv_reserved_bytes": total.host_reserved}

    def stats(self) -> dict[str, float]:
        """Totals of the sparse decode steps over all recallable layers."""
        layers = self.recallable_layers
        total = LayerStats()
        for layer in layers:
            layer.settle()
            for field in dataclasses.fields(LayerStats):
                setattr(total, field.name, getattr(total, field.name) + getattr(layer.stats, field.name))
        return {**total.__dict__, "recall_hidden": total.recall_hidden, "recallable_layers": len(layers)}

    # --- snapshots ---------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, model: torch.nn.Module) -> None:
        """Write the cache to ``directory`` (replaced atomically): every layer's tiers and state, the method and
        its knobs, and ``model``'s fingerprint. ``LiveKVCache.load(directory, model)`` continues bit-identically."""
        tensors, layers = snapshot.layer_states(self.layers)
        snapshot.write(directory, "livekv-cache", model, {
            "method": self.method.name, "knobs": dataclasses.asdict(self.method), "layers": layers,
            "seq_length": self.get_seq_length()}, tensors)

    @classmethod
    def load(cls, directory: str | os.PathLike, model: torch.nn.Module) -> LiveKVCache:
        """The cache saved in ``directory`` by ``save``, for ``model`` (its fast tier on the model's device).
        ``snapshot.SnapshotError`` if it was saved for another model or is damaged: nothing is loaded then."""
        manifest, tensors = snapshot.read(directory, "livekv-cache", model)
        device = next(model.parameters()).device
        with snapshot.restoring(directory):
            cache = cls(model.config, make_method(manifest["method"], **snapshot.knobs_here(manifest["knobs"])))
            snapshot.load_layers(cache.layers, manifest, tensors, device)
        return cache
