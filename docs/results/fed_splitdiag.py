"""Fed protocol diagnosis: which sparse question steps cost the answer. Variants: fed (every question token sparse),
last2dense (all but the last 2 fed sparse, the last 2 prefilled densely), last2sparse (all but the last 2 prefilled
densely, the last 2 fed sparse), window64 (fed, window 64). Usage: splitdiag.py SPLIT task#index ..."""
import json, sys
import torch
from livekv.models import load_model
from livekv.cache import LiveKVCache
from livekv.evals.ruler import make_case, fork, score
from livekv.evals.ruler.run import _complete
from livekv.generation import prefill, feed

torch.set_num_threads(1)
model, tok = load_model(None)

def decode(cache, logits, case):
    tokens = []
    for _ in range(case.max_new_tokens):
        t = int(logits.argmax(-1))
        if t == tok.eos_token_id:
            break
        tokens.append(t)
        if _complete(tok.decode(tokens), case.expected):
            break
        logits = model(torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits[:, -1]
    return tok.decode(tokens, skip_special_tokens=True).strip()

with torch.no_grad():
    for spec in sys.argv[2:]:
        task, index = spec.split("#")
        case = make_case(tok, task, sys.argv[1], int(index), 4096)
        q = torch.tensor([case.question_ids])
        prefix = LiveKVCache(model.config, "dense")
        prefill(model, prefix, torch.tensor([case.context_ids]), 2048)
        for method in ("quest", "freekv"):
            for variant in ("fed", "last2dense", "last2sparse", "window64"):
                knobs = {"budget": 256, **({"window": 64} if variant == "window64" else {})}
                cache = fork(model, prefix, method, knobs)
                if variant in ("fed", "window64"):
                    logits = feed(model, cache, q)[:, -1]
                elif variant == "last2dense":
                    feed(model, cache, q[:, :-2]); logits = prefill(model, cache, q[:, -2:])
                else:
                    prefill(model, cache, q[:, :-2]); logits = feed(model, cache, q[:, -2:])[:, -1]
                answer = decode(cache, logits, case)
                print(json.dumps(dict(task=task, index=int(index), method=method, variant=variant,
                                      score=score(answer, case.expected), answer=answer[:50])), flush=True)
