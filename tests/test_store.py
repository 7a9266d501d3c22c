import pytest
import torch

from livekv.store import FastBuffer, HostStore


def _fill(store, chunks, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, _, G, _, _, D = store.pages.shape
    ks, vs = [], []
    for n in chunks:
        k = torch.randn(B, G, n, D, generator=g).to(store.pages.dtype)
        v = torch.randn(B, G, n, D, generator=g).to(store.pages.dtype)
        store.append(k, v)
        ks.append(k)
        vs.append(v)
    return torch.cat(ks, 2), torch.cat(vs, 2)


@pytest.mark.parametrize("page_size", [4, 3])  # row numbers: a shift for powers of two, a division otherwise
def test_recall_is_bit_exact_across_unaligned_appends(page_size):
    store = HostStore(2, 3, 8, page_size=page_size, dtype=torch.float32, device=torch.device("cpu"))
    keys, values = _fill(store, [5, 1, 1, 7, 13, 2])
    assert store.length == 29 and store.num_full_pages == {4: 7, 3: 9}[page_size]
    idx = torch.randint(0, 29, (2, 3, 11), generator=torch.Generator().manual_seed(3))
    k, v = store.gather(idx)
    assert torch.equal(k, keys.gather(2, idx[..., None].expand(-1, -1, -1, 8)))
    assert torch.equal(v, values.gather(2, idx[..., None].expand(-1, -1, -1, 8)))
    all_k, all_v = store.all_tokens()
    assert torch.equal(all_k, keys) and torch.equal(all_v, values)


def test_gather_into_fast_tier_buffer():
    store = HostStore(1, 2, 8, page_size=8, dtype=torch.bfloat16, device=torch.device("cpu"))
    keys, values = _fill(store, [40])
    fast = FastBuffer(1, 2, 8, torch.bfloat16, torch.device("cpu"))
    idx = torch.tensor([[[0, 9, 39]], [[1, 2, 3]]]).view(1, 2, 3)
    k, v = store.gather(idx, out=fast.reserve(3))
    assert k.data_ptr() == fast.keys.data_ptr()
    assert torch.equal(k, keys.gather(2, idx[..., None].expand(-1, -1, -1, 8)))
    assert torch.equal(v, values.gather(2, idx[..., None].expand(-1, -1, -1, 8)))


def test_digests_are_min_and_max_of_full_pages():
    store = HostStore(2, 3, 8, page_size=4, dtype=torch.float32, device=torch.device("cpu"))
    keys, _ = _fill(store, [3, 10])  # 13 tokens: 3 full pages, one partial
    assert store.digests().shape == (2, 3, 3, 16)
    kmax, kmin = store.digests().chunk(2, dim=-1)
    pages = keys[:, :, :12].view(2, 3, 3, 4, 8)
    assert torch.equal(kmax, pages.amax(3)) and torch.equal(kmin, pages.amin(3))


def test_coarse_digests_cover_runs_of_full_pages_and_follow_appends_and_beams():
    store = HostStore(2, 3, 8, page_size=4, dtype=torch.float32, device=torch.device("cpu"))
    _fill(store, [30])  # 7 full pages: two runs of 3
    assert store.coarse_digests(3).shape == (2, 3, 2, 16)
    _fill(store, [23], seed=1)  # 13 full pages: 4 runs, extended from the 2 already made
    kmax, kmin = store.digests().chunk(2, dim=-1)
    for count in (4, 3):
        cmax, cmin = store.coarse_digests(3, count).chunk(2, dim=-1)
        assert torch.equal(cmax, kmax[:, :, : 3 * count].reshape(2, 3, -1, 3, 8).amax(3))
        assert torch.equal(cmin, kmin[:, :, : 3 * count].reshape(2, 3, -1, 3, 8).amin(3))
    with pytest.raises(ValueError, match="5 runs of 3 pages asked for, 4 are full"):
        store.coarse_digests(3, 5)
    store.select_rows(torch.tensor([1, 1]))
    assert torch.equal(store.coarse_digests(3, 3), torch.cat((cmax, cmin), dim=-1)[[1, 1]])


def test_the_coarse_level_counts_the_runs_made_not_the_room_for_more():
    store = HostStore(2, 3, 8, page_size=4, dtype=torch.float32, device=torch.device("cpu"))
    _fill(store, [30])  # 7 full pages
    per_digest = 2 * 3 * 16 * 4  # batch 2, 3 KV heads, max | min of 8 channels, float32
    assert store.digest_memory().used == 7 * per_digest
    store.coarse_digests(3)  # 2 runs of 3 pages
    assert store.digest_memory().used == (7 + 2) * per_digest < store.digest_memory().nbytes


def test_bytes_are_tracked():
    store = HostStore(1, 2, 8, page_size=4, dtype=torch.float32, device=torch.device("cpu"))
    assert store.nbytes == 0
    _fill(store, [16])
    assert store.nbytes >= 16 * 2 * 2 * 8 * 4
    assert store.digest_memory().nbytes >= 4 * 2 * 2 * 8 * 4


def test_wrong_shapes_are_rejected():
    store = HostStore(1, 2, 8, page_size=4, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="shape"):
        store.append(torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 4, 8))
    with pytest.raises(ValueError, match="shape"):
        store.append(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 5, 8))
    assert store.length == 0


@pytest.mark.parametrize("n", [1, 17])
def test_fast_buffer_append_keeps_contents(n):
    fast = FastBuffer(1, 2, 4, torch.float32, torch.device("cpu"))
    chunks = [torch.randn(1, 2, n, 4) for _ in range(5)]
    for c in chunks:
        fast.append(c, -c)
    k, v = fast.view()
    assert torch.equal(k, torch.cat(chunks, 2)) and torch.equal(v, -k)


def test_resident_set_copies_only_missing_tokens_and_matches_plain_recall():
    from livekv.slots import ResidentSet

    store = HostStore(2, 3, 8, page_size=4, dtype=torch.float32, device=torch.device("cpu"))
    _fill(store, [100])
    resident = ResidentSet(2, 3, 8, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    previous = None
    for step in range(6):
        k = 20 - (step % 3)  # the selection size varies a little, as with pages of a window
        rows = []
        for b in range(2):
            for h in range(3):
                keep = previous[b, h, :10].tolist() if previous is not None and step % 2 else []  # still resident
                rest = [t for t in torch.randperm(100, generator=g).tolist() if t not in keep]
                rows.append(keep + rest[: k - len(keep)])
        idx = torch.tensor(rows).view(2, 3, k)
        keys, values, valid, copied = resident.recall(store, idx)
        want_k, want_v = store.gather(idx)
        valid = torch.ones(keys.shape[:3], dtype=torch.bool) if valid is None else valid
        for b in range(2):
            for h in range(3):
                got = dict(zip(resident.token[b, h][valid[b, h]].tolist(), keys[b, h][valid[b, h]]))
                assert sorted(got) == sorted(idx[b, h].tolist())
                for j, t in enumerate(idx[b, h].tolist()):
                    assert torch.equal(got[t], want_k[b, h, j])
                vals = dict(zip(resident.token[b, h][valid[b, h]].tolist(), values[b, h][valid[b, h]]))
                assert all(torch.equal(vals[t], want_v[b, h, j]) for j, t in enumerate(idx[b, h].tolist()))
        if previous is not None and step % 2:
            reused = sum(len(set(idx[b, h].tolist()) & set(previous[b, h].tolist())) for b in range(2) for h in range(3))
            assert copied == idx.numel() - reused  # nothing already resident was copied again
        previous = idx
