"""The quantized host tier (``host_bits`` 8 and 4): every element within half a step of what was stored and the
residual exact; every read path agrees; 16 bits is the exact store; its bytes; page selection unchanged; a model
reads it close to dense; snapshots of quantized caches and stream sessions continue bit-identically."""

import pytest
import torch
from stream_models import tiny_llava_onevision

from conftest import check_cuda_recall_like_cpu, decode, tiny_model
from livekv import LiveKVCache, make_method
from livekv.disk import DiskHostStore, QuantDiskHostStore, make_host_store
from livekv.quantized import QuantHostStore, affine, decode as dequantize, encode
from livekv.recall import RecallEngine, copy_pages
from livekv.slots import PageSlots
from livekv.store import HostStore
from livekv.stream.adapters import LlavaOnevisionAdapter
from livekv.stream.session import StreamSession

CPU = torch.device("cpu")
CHUNKS = [5, 1, 1, 7, 13, 40, 2, 30, 3]  # 102 tokens, unaligned: 96 quantized (3 groups of 32), 6 residual


def _fill(store, chunks=CHUNKS, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    B, G, D = store.batch, store.kv_heads, store.head_dim
    ks, vs = [], []
    for n in chunks:
        ks.append((scale * torch.randn(B, G, n, D, generator=g) + 3).to(store.dtype))  # an offset: zero points matter
        vs.append((scale * torch.randn(B, G, n, D, generator=g)).to(store.dtype))
        store.append(ks[-1], vs[-1])
    return torch.cat(ks, 2), torch.cat(vs, 2)


def _steps(store):
    """The quantization step of every quantized element: keys ``[B, G, q, D]`` (their group's), values
    ``[B, G, q, 1]``."""
    q, p = store.quantized, store.page_size
    k_scale = store.key_scales[:, : q // store.group, :, 0].transpose(1, 2)  # [B, G, groups, D]
    k_step = k_scale.float().repeat_interleave(store.group, dim=2)
    v_step = store.value_scales[:, : q // p, :, 0].permute(0, 2, 1, 3).reshape(store.batch, store.kv_heads, q, 1)
    return k_step, v_step.float()


@pytest.mark.parametrize("kind", ["ram", "disk"])
@pytest.mark.parametrize("bits", [8, 4])
def test_every_element_is_within_half_a_step_and_the_residual_is_exact(tmp_path, bits, kind):
    store = make_host_store(kind, 2, 3, 16, 4, torch.float32, CPU, bits=bits, directory=str(tmp_path))
    assert type(store) is (QuantHostStore if kind == "ram" else QuantDiskHostStore)
    keys, values = _fill(store)
    assert (store.length, store.quantized, store.group) == (102, 96, 32)
    got_k, got_v = store.all_tokens()
    q = store.quantized
    assert torch.equal(got_k[:, :, q:], keys[:, :, q:]) and torch.equal(got_v[:, :, q:], values[:, :, q:])
    k_step, v_step = _steps(store)
    levels = 2**bits - 1
    for got, want, step, reduce in ((got_k, keys, k_step, 2), (got_v, values, v_step, 3)):
        err = (got[:, :, :q] - want[:, :, :q]).abs()
        assert bool((err <= step / 2 * (1 + 1e-3) + 1e-6 * want[:, :, :q].abs()).all())
        assert float(err.max()) > 0  # really quantized
        # the steps are tight: the group's range over the levels, up to float16's rounding outward
        if reduce == 2:
            groups = want[:, :, :q].unflatten(2, (-1, store.group))
            span = (groups.amax(3) - groups.amin(3)).repeat_interleave(store.group, dim=2)
        else:
            span = want[:, :, :q].amax(3, keepdim=True) - want[:, :, :q].amin(3, keepdim=True)
        assert bool((step <= span / levels * (1 + 2**-9) + 1e-3).all())


def test_bfloat16_keys_and_values_are_within_half_a_step_and_a_rounding():
    store = QuantHostStore(1, 2, 64, 16, torch.bfloat16, CPU, bits=4)
    keys, values = _fill(store, [100, 37], scale=20.0)
    got_k, got_v = store.all_tokens()
    assert got_k.dtype == torch.bfloat16
    k_step, v_step = _steps(store)
    q = store.quantized
    for got, want, step in ((got_k, keys, k_step), (got_v, values, v_step)):
        want = want[:, :, :q].float()
        bound = step / 2 * 1.001 + want.abs() * 2**-8 + 2**-8 * step  # half a step, bfloat16's rounding
        assert bool(((got[:, :, :q].float() - want).abs() <= bound).all())


def test_affine_keeps_the_range_inside_the_codes_even_far_from_zero():
    lo = torch.tensor([1000.0, -0.5, 7.0, 3.0])
    hi = torch.tensor([1000.01, 0.25, 7.0, 60000.0])
    for bits in (8, 4):
        scale, zero = affine(lo, hi, bits)
        assert scale.dtype == zero.dtype == torch.float16
        assert bool((zero.float() <= lo).all()) and bool((zero.float() + scale.float() * (2**bits - 1) >= hi).all())
        x = torch.stack((lo, hi, (lo + hi) / 2, lo + (hi - lo) / 3), dim=-1)  # an even count: 4-bit packs pairs
        scale, zero = scale[:, None], zero[:, None]
        back = dequantize(encode(x, scale, zero, bits), scale, zero, bits, torch.float32)
        assert bool(((back - x).abs() <= scale.float() / 2 * 1.001 + 1e-6 * x.abs()).all())


@pytest.mark.parametrize("kind", ["ram", "disk"])
@pytest.mark.parametrize("bits", [8, 4])
def test_gather_rows_blocks_and_all_tokens_return_the_same_tokens(tmp_path, bits, kind):
    store = make_host_store(kind, 2, 3, 8, 4, torch.bfloat16, CPU, bits=bits, directory=str(tmp_path))
    _fill(store)
    keys, values = store.all_tokens()
    T, D = store.length, store.head_dim
    idx = torch.randint(0, T, (2, 3, 40), generator=torch.Generator().manual_seed(3))
    k, v = store.gather(idx)
    expand = idx[..., None].expand(-1, -1, -1, D)
    assert torch.equal(k, keys.gather(2, expand)) and torch.equal(v, values.gather(2, expand))
    b, g = torch.tensor([0, 1, 1, 0, 1]), torch.tensor([2, 0, 1, 1, 2])
    t = torch.tensor([0, 31, 32, 95, 101])  # both sides of a group boundary, the residual's first and last token
    rk, rv = store.gather_rows(store.rows(b, g, t))
    assert torch.equal(rk, keys[b, g, t]) and torch.equal(rv, values[b, g, t])
    page = torch.tensor([0, 7, 8, 23, 25])  # quantized pages, the first residual page, the partial tail page
    blocks = store.blocks(b, g, page)
    for i in range(len(page)):
        n = min(4, T - 4 * int(page[i]))
        tokens = slice(4 * int(page[i]), 4 * int(page[i]) + n)
        assert torch.equal(blocks[i, 0, :n], keys[b[i], g[i], tokens])
        assert torch.equal(blocks[i, 1, :n], values[b[i], g[i], tokens])
    out = torch.empty_like(blocks)
    assert store.blocks(b, g, page, out=out) is out and torch.equal(out, blocks)


def test_freekv_streamed_recall_of_a_quantized_tier_equals_the_blocking_copy():
    store = QuantHostStore(2, 3, 8, 4, torch.float32, CPU, bits=4)
    _fill(store, [203])  # 192 quantized, 11 residual: the last pages come from the residual
    n = 37
    g = torch.Generator().manual_seed(1)
    page = torch.randint(0, 51, (n,), generator=g)
    slot = torch.randperm(2 * 3 * 40, generator=g)[:n]
    b, h, slot = slot // 120, slot // 40 % 3, slot % 40
    blocking, streamed = (PageSlots(2, 3, 8, 4, torch.float32, CPU) for _ in range(2))
    for s in (blocking, streamed):
        s._grow(40)
    copy_pages(store, blocking, b, h, page, slot)
    RecallEngine(group=5).stream(store, streamed, b, h, page, slot)
    assert torch.equal(blocking.keys, streamed.keys) and torch.equal(blocking.values, streamed.values)
    k, _ = store.all_tokens()
    assert torch.equal(streamed.keys.view(2, 3, 40, 4, 8)[b, h, slot, 0], k[b, h, page * 4])


@pytest.mark.parametrize("kind", ["ram", "disk"])
def test_16_bits_is_the_exact_store(tmp_path, kind):
    store = make_host_store(kind, 2, 3, 8, 4, torch.bfloat16, CPU, bits=16, directory=str(tmp_path))
    assert type(store) is (HostStore if kind == "ram" else DiskHostStore)
    keys, values = _fill(store)
    assert all(torch.equal(a, b) for a, b in zip(store.all_tokens(), (keys, values)))
    assert make_method("quest").host_bits == 16
    with pytest.raises(ValueError, match="host_bits"):
        make_method("quest", host_bits=12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bytes_of_a_long_input_follow_the_formula(dtype):
    B, G, D, T = 1, 2, 64, 1000
    exact = HostStore(B, G, D, 16, dtype, CPU)
    _fill(exact, [T])
    size = torch.finfo(dtype).bits // 8
    assert exact.used == B * G * T * 2 * D * size
    for bits in (8, 4):
        store = QuantHostStore(B, G, D, 16, dtype, CPU, bits=bits)
        _fill(store, [T])
        q = store.quantized
        assert q == 992
        # per quantized token and KV head: key and value codes, its share of the key group's float16 scale and
        # zero per channel, the value's float16 scale and zero; the 8 residual tokens exact
        per_token = 2 * D * bits // 8 + 2 * 2 * D // 32 + 2 * 2
        assert store.token_bytes == per_token == {8: 140, 4: 76}[bits]
        assert store.used == B * G * (q * per_token + (T - q) * 2 * D * size)
        assert store.nbytes >= store.used
        ratio = store.used / exact.used
        expected = {(8, 2): 0.55, (4, 2): 0.30, (8, 4): 0.28, (4, 4): 0.15}[bits, size]
        assert abs(ratio - expected) < 0.01, ratio


def test_digests_and_page_selection_are_those_of_the_exact_store():
    cfg = make_method("quest", budget=64, page_size=4, dense_layers=0)
    selector = cfg.make_selector(0)
    stores = [make_host_store("ram", 1, 2, 16, 4, torch.float32, CPU, bits=bits) for bits in (16, 8, 4)]
    for store in stores:
        _fill(store, [300, 17, 1, 9])
    query = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(5))
    exact = stores[0]
    picked = selector.select(query, exact)
    for store in stores[1:]:
        assert torch.equal(store.digests(), exact.digests())
        assert torch.equal(store.coarse_digests(4), exact.coarse_digests(4))
        assert torch.equal(selector.select(query, store), picked)
    assert picked.shape[-1] < exact.length  # a real selection


@torch.no_grad()
@pytest.mark.parametrize("method", ["quest", "freekv", "clusterkv"])
def test_a_covering_budget_reads_the_quantized_tier_close_to_dense(ids, method):
    model = tiny_model("llama")
    expected = tiny_model("llama", attn="sdpa")(ids).logits
    errors = {}
    for bits in (16, 8, 4):
        cache = LiveKVCache(model.config, method, budget=4096, host_bits=bits)
        got = decode(model, cache, ids, prefill=120, chunk=50)  # chunked prefill reads the host tier too
        errors[bits] = float((got - expected).abs().max())
        layer = cache.recallable_layers[0]
        assert type(layer.host) is (HostStore if bits == 16 else QuantHostStore)
    assert errors[16] < 1e-4  # exact
    assert 1e-5 < errors[8] < 0.02 and errors[8] < errors[4] < 0.3, errors


@torch.no_grad()
@pytest.mark.parametrize("host", ["ram", "disk"])
def test_chunks_before_the_first_key_group_is_full_read_the_exact_tokens(ids, host):
    model = tiny_model("llama")
    logits = {}
    for bits in (16, 8, 4):  # 20 tokens in chunks of 6: every chunk attends over the tier, none quantized yet
        cache = LiveKVCache(model.config, "quest", budget=64, page_size=4, host_bits=bits, host=host)
        logits[bits] = decode(model, cache, ids[:, :24], prefill=20, chunk=6)
    assert torch.allclose(logits[8], logits[16], atol=1e-6) and torch.allclose(logits[4], logits[16], atol=1e-6)


def _roundtrip_cache(tmp_path, ids, method, **knobs):
    model = tiny_model("llama")
    cache = LiveKVCache(model.config, method, **knobs)
    decode(model, cache, ids[:, :150], prefill=120)
    cache.save(tmp_path / "snap", model)
    restored = LiveKVCache.load(tmp_path / "snap", model)
    assert restored.memory()["host_kv_bytes"] == cache.memory()["host_kv_bytes"]
    expected = decode(model, cache, ids[:, 150:200], prefill=0)
    got = decode(model, restored, ids[:, 150:200], prefill=0)
    assert torch.equal(got, expected)
    return cache, restored, model


@pytest.mark.parametrize("method, knobs", [("quest", dict(budget=48, page_size=8, host_bits=4)),
                                           ("freekv", dict(budget=48, page_size=8, tau=float("-inf"), host_bits=8)),
                                           ("quest", dict(budget=48, page_size=8, host_bits=4, host="disk"))])
def test_a_restored_quantized_cache_continues_bit_identically(tmp_path, ids, method, knobs):
    cache, restored, model = _roundtrip_cache(tmp_path, ids, method, **knobs)
    a, b = cache.recallable_layers[0].host, restored.recallable_layers[0].host
    assert isinstance(b, QuantHostStore) and b.bits == knobs["host_bits"]
    assert all(torch.equal(x, y) for x, y in zip(a.all_tokens(), b.all_tokens()))
    exact = LiveKVCache(model.config, method, **{**knobs, "host_bits": 16, "host": "ram"})
    decode(model, exact, ids[:, :150], prefill=120)
    assert cache.memory()["host_kv_bytes"] < 0.6 * exact.memory()["host_kv_bytes"]


def test_a_snapshot_of_another_host_precision_is_refused(tmp_path, ids):
    model = tiny_model("llama")
    cache = LiveKVCache(model.config, "quest", budget=48, page_size=8, host_bits=8)
    decode(model, cache, ids[:, :130], prefill=120)
    store = QuantHostStore(*cache.recallable_layers[0].host.residual.shape[:2], 16, 8, torch.float32, CPU, bits=4)
    with pytest.raises(ValueError, match="4 bits"):
        store.load_state(cache.recallable_layers[0].host.state(), 130)
    with pytest.raises(ValueError, match="host_bits"):
        HostStore(1, 2, 16, 8, torch.float32, CPU).load_state(cache.recallable_layers[0].host.state(), 130)


@pytest.fixture(scope="module")
def llava():
    return LlavaOnevisionAdapter(tiny_llava_onevision())


def clip(seed):
    return torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method, knobs", [("livevlm", dict(offload=True, host_bits=4)), ("rekv", dict(host_bits=8))])
def test_a_restored_stream_session_with_a_quantized_host_tier_continues_bit_identically(tmp_path, llava, method, knobs):
    with pytest.raises(ValueError, match="host_bits"):
        StreamSession(llava, method, system=[1, 2, 3], memory_tokens=24, **{**knobs, "host_bits": 2})
    session = StreamSession(llava, method, system=[1, 2, 3], memory_tokens=24, **knobs)
    exact = StreamSession(llava, method, system=[1, 2, 3], memory_tokens=24, **{**knobs, "host_bits": 16})
    for s in (session, exact):
        for i in range(12):
            s.push(clip(i))
    host = session.cache.layers[0].host
    assert isinstance(host, QuantHostStore) and host.quantized > 0
    assert 0 < session.memory()["host_kv_bytes"] < 0.7 * exact.memory()["host_kv_bytes"]
    session.answer([4, 5], 2)
    session.save(tmp_path / "snap")
    restored = StreamSession.load(tmp_path / "snap", llava)
    used = lambda s: {k: v for k, v in s.memory().items() if "reserved" not in k}  # noqa: E731
    assert used(restored) == used(session)
    for s in (session, restored):
        for i in range(12, 18):
            s.push(clip(i))
    assert torch.equal(restored.logits([6, 7]), session.logits([6, 7]))
    assert restored.answer([6, 7], 4) == session.answer([6, 7], 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@torch.no_grad()
def test_cuda_streams_recall_a_quantized_tier_like_the_cpu(ids):
    cuda = torch.device("cuda")
    store = QuantHostStore(2, 3, 8, 4, torch.float32, CPU, bits=4)
    pinned = QuantHostStore(2, 3, 8, 4, torch.float32, cuda, bits=4)
    keys, values = _fill(store, [203])
    pinned.append(keys.to(cuda), values.to(cuda))
    check_cuda_recall_like_cpu(store, pinned, 51)
