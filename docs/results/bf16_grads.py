"""Does bfloat16 autocast bend the training signal? For fixed long batches, each loss term's gradient under
bfloat16 autocast against float32 for a checkpoint: cosine and norm ratio over the model's weights, and with
``--modules TERM`` that term's per module (vision tower layers, projector, each decoder layer's attention, MLP, norms).

    python docs/results/bf16_grads.py MODEL_DIR [--batches 2] [--batch 4] [--modules answer]

Diagnostic only; not imported by livekv."""

import argparse

import numpy as np
import torch

from livekv.vlm.data import sample
from livekv.vlm.losses import ATTENTION_TERMS, loss_terms, training_probes
from livekv.vlm.model import load_default_vlm


def gradients(adapter, probes, streams, params, bf16):
    """Per loss term: (its value, its gradient per parameter, float32, zeros where unused)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        losses = loss_terms(adapter, probes, streams, attention_terms=ATTENTION_TERMS)[0]
    out = {}
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out[name] = (float(loss.detach()), [(g if g is not None else torch.zeros_like(p)).flatten().float()
                                            for g, p in zip(grads, params)])
    return out


def compare(g32: list[torch.Tensor], g16: list[torch.Tensor]) -> str:
    a, b = torch.cat(g32), torch.cat(g16)
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return f"grad cosine {cos:.3f}  norm bf16/fp32 {float(b.norm() / a.norm().clamp(min=1e-30)):.3f}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--modules", help="a loss term to break down per module")
    args = parser.parse_args()
    torch.manual_seed(0)
    adapter = load_default_vlm(args.model)
    adapter.model.set_attn_implementation("eager")
    adapter.model.train()
    probes = training_probes(adapter)
    named = list(adapter.model.named_parameters())  # the probes are fresh here: the model's gradients only
    params = [p for _, p in named]
    module = [".".join(n.split(".")[:5]) for n, _ in named]  # e.g. model.language_model.layers.0.self_attn
    rng = np.random.default_rng(1)
    for b in range(args.batches):
        streams = [sample(rng, 130.0, 104.0) for _ in range(args.batch)]
        f32, b16 = (gradients(adapter, probes, streams, params, bf16) for bf16 in (False, True))
        for name in f32:
            (l32, g32), (l16, g16) = f32[name], b16[name]
            print(f"batch {b}  {name:15s} loss fp32 {l32:.4f} bf16 {l16:.4f} | {compare(g32, g16)}", flush=True)
        if args.modules:
            g32, g16 = f32[args.modules][1], b16[args.modules][1]
            for m in dict.fromkeys(module):
                pick = [i for i, n in enumerate(module) if n == m]
                print(f"batch {b}  {args.modules} {m:55s} |fp32| {float(torch.cat([g32[i] for i in pick]).norm()):.3e} "
                      f"| {compare([g32[i] for i in pick], [g16[i] for i in pick])}")


if __name__ == "__main__":
    main()
