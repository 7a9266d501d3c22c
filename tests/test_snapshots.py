"""Snapshots of caches and stream sessions: a restored one continues bit-identically (every method, text and
stream, RAM and disk host tiers); a snapshot of another model, of another kind, of an unknown format, truncated or
corrupted is refused with a clear error and loads nothing."""

import json

import pytest
import torch
from stream_models import tiny_llava_onevision

from conftest import decode, tiny_model
from livekv import LiveKVCache, SnapshotError
from livekv.stream.adapters import LlavaOnevisionAdapter
from livekv.stream.session import StreamSession

TEXT = {"dense": {}, "dense:kv_bits=8": {}, "sink_window": dict(budget=40), "quest": dict(budget=48, page_size=8),
        "quest:digest_bits=8,coarse_pages=2": dict(budget=48, page_size=4),
        "freekv": dict(budget=48, page_size=8, tau=float("-inf")), "clusterkv": dict(budget=48),
        "clusterkv:centroid_bits=8": dict(budget=48)}  # freekv: never
# corrects, so that the restored speculation is what its next step reads
STREAM = {"full": {}, "sink_window": {}, "rekv": {}, "livevlm": {}, "livevlm offload": dict(offload=True)}


@pytest.mark.parametrize("host", ["ram", "disk"])
@pytest.mark.parametrize("method", list(TEXT))
def test_a_restored_cache_continues_bit_identically(tmp_path, ids, method, host):
    dense = method.startswith("dense")
    if dense and host == "disk":
        pytest.skip("dense has no host tier")
    model = tiny_model("llama")
    knobs = {**TEXT[method], **({"host": host} if not dense else {})}
    cache = LiveKVCache(model.config, method, **knobs)
    decode(model, cache, ids[:, :150], prefill=120)  # past the budget: selections, clusterings, resident slots, speculation
    cache.save(tmp_path / "snap", model)
    restored = LiveKVCache.load(tmp_path / "snap", model)
    assert restored.get_seq_length() == 150 and restored.memory()["host_kv_bytes"] == cache.memory()["host_kv_bytes"]
    expected, got = decode(model, cache, ids[:, 150:200], prefill=0), decode(model, restored, ids[:, 150:200], prefill=0)
    assert torch.equal(got, expected)
    assert restored.memory()["fast_kv_bytes"] == cache.memory()["fast_kv_bytes"]
    if not dense:
        assert restored.stats()["steps"] == cache.stats()["steps"]


@pytest.fixture(scope="module")
def llava():
    return LlavaOnevisionAdapter(tiny_llava_onevision())


def clip(seed):
    return torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("host", ["ram", "disk"])
@pytest.mark.parametrize("method", list(STREAM))
def test_a_restored_session_continues_bit_identically(tmp_path, llava, method, host):
    name = method.split()[0]
    knobs = {**STREAM[method], **({"host": host} if name in ("rekv", "livevlm") else {})}
    if host == "disk" and "host" not in knobs:
        pytest.skip(f"{name} keeps nothing in a host tier")
    session = StreamSession(llava, name, system=[1, 2, 3], memory_tokens=24, **knobs)
    for i in range(12):
        session.push(clip(i))
    session.answer([4, 5], 2)
    session.save(tmp_path / "snap")
    restored = StreamSession.load(tmp_path / "snap", llava)
    used = lambda s: {k: v for k, v in s.memory().items() if "reserved" not in k}  # noqa: E731
    assert used(restored) == used(session) and restored.stats == session.stats
    assert (session.memory()["host_kv_bytes"] > 0) == (method in ("rekv", "livevlm offload"))
    for s in (session, restored):
        for i in range(12, 18):
            s.push(clip(i))
    assert torch.equal(restored.logits([6, 7]), session.logits([6, 7]))
    assert restored.answer([6, 7], 4) == session.answer([6, 7], 4)
    for a, b in zip(session.cache.layers, restored.cache.layers):
        assert torch.equal(a.ctx.view()[0], b.ctx.view()[0]) and torch.equal(a.pos, b.pos)


def test_a_snapshot_whose_disk_folder_is_gone_loads_into_the_temp_dir(tmp_path, llava):
    folder = tmp_path / "spill"
    folder.mkdir()
    session = StreamSession(llava, "livevlm", system=[1, 2, 3], memory_tokens=24, offload=True, host="disk",
                            host_dir=str(folder))
    for i in range(12):
        session.push(clip(i))
    session.save(tmp_path / "snap")
    folder.rmdir()  # the snapshot moved to another machine, or the folder was cleaned
    with pytest.warns(UserWarning, match="not a directory here"):
        restored = StreamSession.load(tmp_path / "snap", llava)
    assert restored.method.host_dir is None and restored.memory()["host_kv_bytes"] > 0
    assert torch.equal(restored.logits([6, 7]), session.logits([6, 7]))


def test_livevlm_offload_keeps_what_compression_evicts_in_the_host_tier(llava):
    kept = StreamSession(llava, "livevlm", system=[1, 2, 3], memory_tokens=24, offload=True)
    plain = StreamSession(llava, "livevlm", system=[1, 2, 3], memory_tokens=24)
    for s in (kept, plain):
        for i in range(20):
            s.push(clip(i))
    assert kept.memory()["memory_tokens"] == plain.memory()["memory_tokens"]  # the fast tier as bounded
    layer = kept.cache.layers[0]
    seen = 3 + 20 * (2 * llava.tokens_per_frame + 1)
    assert layer.host.length + layer.ctx.length == seen  # nothing seen is lost
    assert plain.cache.layers[0].host is None and plain.memory()["host_kv_bytes"] == 0


def test_bad_snapshots_are_refused_and_load_nothing(tmp_path, ids):
    model = tiny_model("llama")
    cache = LiveKVCache(model.config, "quest", budget=48, page_size=8)
    with torch.no_grad():
        model(ids[:, :100], past_key_values=cache)
    cache.save(tmp_path / "snap", model)

    with pytest.raises(SnapshotError, match="another model .*weights"):
        LiveKVCache.load(tmp_path / "snap", tiny_model("llama", seed=1))
    with pytest.raises(SnapshotError, match="another model .*config"):
        LiveKVCache.load(tmp_path / "snap", tiny_model("llama", num_hidden_layers=3))
    with pytest.raises(SnapshotError, match="not a 'livekv-stream'"):
        StreamSession.load(tmp_path / "snap", LlavaOnevisionAdapter(tiny_llava_onevision()))
    with pytest.raises(SnapshotError, match="no snapshot"):
        LiveKVCache.load(tmp_path / "nowhere", model)

    tensors = tmp_path / "snap" / "tensors.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(SnapshotError, match="truncated or corrupt"):
        LiveKVCache.load(tmp_path / "snap", model)
    corrupt = bytearray(data)
    corrupt[-10] ^= 0xFF
    tensors.write_bytes(bytes(corrupt))
    with pytest.raises(SnapshotError, match="truncated or corrupt"):
        LiveKVCache.load(tmp_path / "snap", model)
    tensors.write_bytes(data)
    assert LiveKVCache.load(tmp_path / "snap", model).get_seq_length() == 100

    manifest = tmp_path / "snap" / "manifest.json"
    content = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**content, "format": 99}))
    with pytest.raises(SnapshotError, match="format 99; this livekv reads format 1"):
        LiveKVCache.load(tmp_path / "snap", model)
    manifest.write_text("{not json")
    with pytest.raises(SnapshotError, match="corrupt"):
        LiveKVCache.load(tmp_path / "snap", model)
    lies = {"describes 3 layers; the model has 4": {**content, "layers": content["layers"][:3]},
            "does not describe .*KeyError": {k: v for k, v in content.items() if k != "knobs"},
            "does not describe .*budget": {**content, "knobs": {**content["knobs"], "budget": "many"}}}
    for message, lie in lies.items():  # the manifest itself is not checksummed: what it says is checked
        manifest.write_text(json.dumps(lie))
        with pytest.raises(SnapshotError, match=message):
            LiveKVCache.load(tmp_path / "snap", model)


def test_saving_over_a_snapshot_replaces_it_whole(tmp_path, ids):
    model = tiny_model("llama")
    cache = LiveKVCache(model.config, "dense")
    with torch.no_grad():
        model(ids[:, :50], past_key_values=cache)
        cache.save(tmp_path / "snap", model)
        model(ids[:, 50:60], past_key_values=cache)
    cache.save(tmp_path / "snap", model)
    assert LiveKVCache.load(tmp_path / "snap", model).get_seq_length() == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]  # no temporary or old copy left behind
