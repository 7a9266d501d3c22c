"""Bytes of quest's two-level digests at 32k, counted by content and by allocation (a check of a memory figure).

    python docs/results/coarse_bytes.py > docs/results/coarse_bytes.txt

One sparse layer of SmolLM2 at batch 1 (3 KV heads, head dim 64), pages of 2, runs of 8 pages, as
``bench decode`` fills it: a 32,768-token prefill in chunks of 512, then 16 decode steps asking for the coarse level.
"""

import torch

from livekv.store import HostStore

torch.manual_seed(0)
for bits in (32, 8):
    store = HostStore(1, 3, 64, page_size=2, dtype=torch.float32, device=torch.device("cpu"), digest_bits=bits)
    for _ in range(0, 32768, 512):
        store.append(torch.randn(1, 3, 512, 64), torch.randn(1, 3, 512, 64))
    for _ in range(16):
        store.append(torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64))
        store.coarse_digests(8)
    _, runs, count = store.page_digests.coarse
    used = store.digest_memory().used
    allocation_as_used = store.page_digests.page_bytes * store.num_full_pages + runs.nbytes
    print(f"digest_bits={bits}: {count} runs in {runs.shape[2]} rows; digests used {used} bytes, "
          f"with the coarse level's allocation counted {allocation_as_used} (+{allocation_as_used - used})")
