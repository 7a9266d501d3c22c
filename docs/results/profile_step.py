# Where a decode step at 32k goes: torch.profiler over 3 steps, one method and form, 2 threads.
# usage: prof_step.py DTYPE METHOD WEIGHTS
import sys, time, torch
from livekv.models import load_model
from livekv.cache import LiveKVCache
from livekv.bench.decode import fill_cache
from livekv.generation import prefill
from livekv.evals.corpus import filler_token_ids
from livekv.quantize import quantize_weights
dtype, method, weights = getattr(torch, sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(2)
model, tok = load_model(dtype=dtype)
quantize_weights(model, weights)
ids = torch.tensor([filler_token_ids(tok, 1024)])
src = LiveKVCache(model.config, "dense"); prefill(model, src, ids)
kv = [l.fast.view() for l in src.layers]
c = LiveKVCache(model.config, method, ignore_unknown=True, budget=256); fill_cache(c, kv, 32768)
t = ids[:, -1:]
with torch.no_grad():
    for _ in range(3): model(t, past_key_values=c, use_cache=True, logits_to_keep=1)
    t0 = time.perf_counter()
    for _ in range(6): model(t, past_key_values=c, use_cache=True, logits_to_keep=1)
    ms = (time.perf_counter() - t0) / 6 * 1000
    with torch.profiler.profile() as p:
        for _ in range(3): model(t, past_key_values=c, use_cache=True, logits_to_keep=1)
    c.wait()
print(f"{sys.argv[1:]} {ms:.1f} ms/token (unprofiled)")
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
