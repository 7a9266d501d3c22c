import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import livekv  # noqa: F401  (registers the "livekv" attention)

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


def tiny_model(arch: str = "llama", attn: str = "livekv", seed: int = 0, **overrides):
    """A tiny random Llama or Qwen2 causal LM (float32, eval mode)."""
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**{**TINY, **overrides}))
    else:
        raise ValueError(arch)
    model.set_attn_implementation(attn)
    return model.eval()


@torch.no_grad()
def decode(model, cache, ids, prefill: int, chunk: int | None = None) -> torch.Tensor:
    """Prefill ``ids[:, :prefill]`` (in chunks of ``chunk``), then feed the rest token by token (sparse decode
    steps); return the logits of every position, ``[B, T, V]``."""
    chunk = chunk or max(prefill, 1)
    logits = [model(ids[:, i : min(i + chunk, prefill)], past_key_values=cache).logits for i in range(0, prefill, chunk)]
    logits += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(prefill, ids.shape[1])]
    return torch.cat(logits, dim=1)


@pytest.fixture(params=["llama", "qwen2"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture
def ids():
    return torch.randint(0, TINY["vocab_size"], (1, 200), generator=torch.Generator().manual_seed(1))


def check_cuda_recall_like_cpu(store, pinned, n_pages: int) -> None:
    """The double-buffered CUDA recall from ``pinned`` (a store of the same tokens on a GPU) writes the same page
    slots as the blocking CPU copy from ``store`` (batch 2, 3 KV heads, head dim 8, pages of 4)."""
    from livekv.recall import RecallEngine, copy_pages
    from livekv.slots import PageSlots

    cuda = torch.device("cuda")
    n = 37
    slot = torch.randperm(240, generator=torch.Generator().manual_seed(1))[:n]
    b, h, slot = slot // 120, slot // 40 % 3, slot % 40
    page = torch.randint(0, n_pages, (n,), generator=torch.Generator().manual_seed(2))
    cpu, gpu = PageSlots(2, 3, 8, 4, torch.float32, torch.device("cpu")), PageSlots(2, 3, 8, 4, torch.float32, cuda)
    for s in (cpu, gpu):
        s._grow(40)
    copy_pages(store, cpu, b, h, page, slot)
    RecallEngine(group=5).stream(pinned, gpu, b, h, page, slot)
    torch.cuda.current_stream().wait_event(gpu.done)
    assert torch.equal(gpu.keys.cpu(), cpu.keys) and torch.equal(gpu.values.cpu(), cpu.values)
