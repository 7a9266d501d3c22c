"""livekv: a recallable KV cache for transformers.

The full KV lives in a cheap host tier; attention reads a small, query-dependent part of it from the fast tier.

    import livekv
    model, tokenizer = livekv.load_model()            # the embedded SmolLM2-135M-Instruct, attention "livekv"
    cache = livekv.LiveKVCache(model.config, "quest", budget=256)
    input_ids = tokenizer("In the beginning God created the heaven and the earth.", return_tensors="pt").input_ids
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=32)
    print(tokenizer.decode(out[0, input_ids.shape[1]:]), cache.memory())
"""

from livekv.attention import ATTN_IMPLEMENTATION
from livekv.cache import LiveKVCache
from livekv.methods import METHODS, MethodConfig, make_method
from livekv.models import load_model
from livekv.snapshot import SnapshotError

__all__ = ["ATTN_IMPLEMENTATION", "LiveKVCache", "METHODS", "MethodConfig", "SnapshotError", "load_model",
           "make_method"]
