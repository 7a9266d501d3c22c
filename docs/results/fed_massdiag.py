"""Fed protocol diagnosis: dense attention mass that each sparse step's selection covers, at the question's tokens
(fed one by one) against the answer's tokens, per method. Usage: massdiag.py SPLIT BUDGET CONTEXT task#index ..."""
import collections, json, sys
import torch
from livekv.models import load_model
from livekv.cache import LiveKVCache
from livekv.evals.ruler import make_case, fork, answer_case, score
from livekv.generation import prefill

torch.set_num_threads(1)
split, budget, context = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model, tok = load_model(None)
out = []
for spec in sys.argv[4:]:
    task, index = spec.split("#")
    case = make_case(tok, task, split, int(index), context)
    n_ctx, n_q = len(case.context_ids), len(case.question_ids)
    prefix = LiveKVCache(model.config, "dense")
    prefill(model, prefix, torch.tensor([case.context_ids]), 2048)
    for method in ("quest", "freekv", "clusterkv"):
        for protocol in ("prompt", "fed"):
            cache = fork(model, prefix, method, {"budget": budget})
            mass = collections.defaultdict(list)  # (kind, layer) -> [mass per head]
            def observer(layer, q, token_idx, o):
                T = layer.host.length
                kind = "question" if T <= n_ctx + n_q else "answer"
                keys = layer.host.all_tokens()[0][0]  # [G, T, D]
                G, D = keys.shape[0], keys.shape[-1]
                qh = q[0].view(G, -1, D)
                att = ((qh @ keys.transpose(1, 2)) * D ** -0.5).softmax(-1)  # [G, r, T]
                sel = token_idx[0].clamp(min=0)  # [G, k]
                m = torch.gather(att, 2, sel[:, None, :].expand(-1, att.shape[1], -1)).sum(-1)  # [G, r]
                mass[(kind, layer.layer_idx)].append(m.flatten())
            for L in cache.layers:
                if hasattr(L, "observers"):
                    L.observers.append(observer)
            answer = answer_case(model, tok, cache, case, protocol)
            rec = dict(task=task, index=int(index), method=method, protocol=protocol, score=score(answer, case.expected),
                       answer=answer[:60], expected=case.expected, n_question=n_q)
            for kind in ("question", "answer"):
                vals = [torch.stack(v) for (k, _), v in mass.items() if k == kind]
                if vals:
                    allv = torch.cat([v.flatten() for v in vals])
                    rec[f"{kind}_mass_mean"] = round(float(allv.mean()), 3)
                    rec[f"{kind}_mass_p10"] = round(float(allv.quantile(0.1)), 3)
                    rec[f"{kind}_heads_below_0.5"] = round(float((allv < 0.5).float().mean()), 3)
            out.append(rec)
            print(json.dumps(rec), flush=True)
json.dump(out, open(f"massdiag_{split}_{context}.json", "w"), indent=1)
