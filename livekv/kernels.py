"""Compiled CPU kernels: the fast paths, each with the signature of a PyTorch reference it is tested against.

``quest_select`` is Quest's decode-step selection over int8 page digests (``csrc/pick.cpp``) in one call per layer,
with AVX-512 VNNI, on torch's threads (OpenMP): the reference (``sink_pages_window`` over ``QuestSelector.pick``)
spends most of its time in small PyTorch ops around three int8 kernel calls per level. ``clusterkv_select`` is
ClusterKV's, over int8 centroids. The source is compiled with the system's ``g++`` on first use into ``$XDG_CACHE_HOME/livekv``
(about a second) and loaded with ctypes. Where there is no ``g++``, no AVX-512 VNNI, or ``LIVEKV_KERNELS=0``,
``available()`` is false and callers take the reference path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "pick.cpp"


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "livekv"


def _build() -> Path:
    """The shared library of ``SOURCE``, compiled once per source text (written atomically: concurrent builds are
    safe)."""
    text = SOURCE.read_bytes()
    lib = _cache_dir() / f"pick-{hashlib.sha256(text).hexdigest()[:16]}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            subprocess.run(["g++", "-O3", "-fopenmp", "-shared", "-fPIC", "-o", str(out), str(SOURCE)],
                           check=True, capture_output=True, text=True)
            os.replace(out, lib)
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("LIVEKV_KERNELS", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        warnings.warn(f"livekv: compiled CPU kernels unavailable, using the PyTorch path ({detail})", stacklevel=3)
        return None
    if not lib.livekv_supported():
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.livekv_quest_select.argtypes = [i32, i32, i32, i32, p, p, p, i64, i64, p, p, i64, i64, i32] + [i64] * 9 + [p]
    lib.livekv_quest_select.restype = i32
    lib.livekv_clusterkv_select.argtypes = [i32, i32, i32, i32, p, p, p, i64, i64, i64, p, p, p] + [i64] * 5 + [p]
    lib.livekv_clusterkv_select.restype = i32
    return lib


def available() -> bool:
    """Whether the compiled kernels run here (built and loaded on the first call)."""
    return _library() is not None


def _rows(rows) -> tuple[int, int, int, int]:
    """Pointers and (batch, KV head) row strides of ``Int8Rows`` ``[B, G, n, C]`` whose rows are contiguous."""
    (cb, cg, cn, cc), (sb, sg, sn), C = rows.codes.stride(), rows.scales.stride(), rows.codes.shape[3]
    if cc != 1 or cn != C or sn != 1:
        raise ValueError("int8 rows must be contiguous within each (batch, KV head)")
    if cb != sb * C or cg != sg * C:
        raise ValueError("int8 codes and scales must have the same row strides")
    return rows.codes.data_ptr(), rows.scales.data_ptr(), sb, sg


def _group_query(lib, query: torch.Tensor, G: int) -> torch.Tensor | None:
    """Query ``[B, H, D]`` as contiguous float32 where the kernels cover it (CPU, at most 16 query heads per KV
    head, head dim 64, 128 or 256), else ``None``."""
    H, D = query.shape[1:]
    if lib is None or query.device.type != "cpu" or H // G > 16 or D not in (64, 128, 256):
        return None
    return query.float().contiguous()


def quest_select(query: torch.Tensor, pages, runs, per: int, keep: int, step) -> torch.Tensor | None:
    """Quest's decode-step token ids ``[B, G, k]`` (``QuestSelector.select``): the sink, the ``step.n`` best pages
    of ``[step.first, step.last)`` by the group-max min/max bound, the window (``step``: a ``StepPages``). Query
    ``[B, H, D]``; ``pages`` the page digests (only rows ``[step.first, step.last)`` are read: the whole buffer
    may be passed) and ``runs`` the digests of the full runs of ``per`` pages (``per`` 0: one level, ``runs``
    unused), both ``Int8Rows`` ``[B, G, n, 2D]``. Two levels: the best ``keep`` runs, then their pages and those
    past the last full run. ``None`` where this kernel does not apply (the caller takes the reference path)."""
    lib = _library()
    (B, H, D), G = query.shape, pages.shape[1]
    q = _group_query(lib, query, G)
    if q is None:
        return None
    out = torch.empty(B, G, step.tokens, dtype=torch.long)
    run_ptrs = _rows(runs) if per else (0, 0, 0, 0)
    rc = lib.livekv_quest_select(B, G, H // G, D, q.data_ptr(), *_rows(pages), *run_ptrs, per,
                                 runs.shape[2] if per else 0, keep, step.first, step.last, step.n, step.sink,
                                 step.page_size, step.window_start, step.length, out.data_ptr())
    return out if rc == 0 else None


def clusterkv_select(query: torch.Tensor, centroids, sizes: torch.Tensor, starts: torch.Tensor, members: torch.Tensor,
                     fill: int, sink: int, clustered: int, length: int) -> torch.Tensor | None:
    """ClusterKV's decode-step token ids ``[B, G, sink + fill + length - clustered]``
    (``ClusterKVSelector.select``): the sink, whole clusters by the group-max ``q . centroid`` in descending order
    (the last one cut) for ``fill`` tokens, the tokens not clustered yet. Query ``[B, H, D]``; ``centroids``
    ``Int8Rows [B, G, n, D]``; ``sizes``, ``starts [B, G, n]`` and ``members [B, G, N]`` the index. ``None`` where
    this kernel does not apply."""
    lib = _library()
    (B, H, D), (G, n) = query.shape, centroids.shape[1:3]
    q = _group_query(lib, query, G)
    if q is None:
        return None
    sizes, starts, members = sizes.contiguous(), starts.contiguous(), members.contiguous()
    out = torch.empty(B, G, sink + fill + length - clustered, dtype=torch.long)
    rc = lib.livekv_clusterkv_select(B, G, H // G, D, q.data_ptr(), *_rows(centroids), n, sizes.data_ptr(),
                                     starts.data_ptr(), members.data_ptr(), members.shape[2], fill, sink, clustered,
                                     length, out.data_ptr())
    return out if rc == 0 else None
