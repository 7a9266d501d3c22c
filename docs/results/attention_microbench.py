# Decode attention over 32k tokens, one layer of SmolLM2's shape (3 KV heads x 3 query heads, head dim 64):
# SDPA vs matmul-softmax-matmul vs the same with the value product split over chunks of the sequence.
import torch, time, torch.nn.functional as F
def t(f, n=30):
    f(); t0 = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t0) / n * 1e3
L = 32768
def manual(q, k, v):
    p = (q @ k.transpose(-1, -2)).float().mul_(0.125).softmax(-1)
    return p.to(v.dtype) @ v
def chunked(q, k, v, c=8):
    B, G, r, D = q.shape
    p = (q @ k.transpose(-1, -2)).float().mul_(0.125).softmax(-1).to(v.dtype)  # [B, G, r, L]
    p = p.view(B, G, r, c, L // c).transpose(2, 3)  # [B, G, c, r, L/c]
    return (p @ v.view(B, G, c, L // c, D)).sum(2, dtype=torch.float32).to(v.dtype)
for th in (1, 2):
    torch.set_num_threads(th)
    for dt in (torch.float32, torch.bfloat16):
        q = torch.randn(1, 3, 3, 64, dtype=dt); k = torch.randn(1, 3, L, 64, dtype=dt); v = torch.randn_like(k)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        for name, f in (("sdpa", lambda: F.scaled_dot_product_attention(q, k, v)), ("manual", lambda: manual(q, k, v)),
                        ("chunk4", lambda: chunked(q, k, v, 4)), ("chunk16", lambda: chunked(q, k, v, 16))):
            err = (f().float() - ref).abs().max().item()
            print(f"threads={th} {str(dt):14s} {name:7s} {t(f):7.3f} ms  max err {err:.1e}")
