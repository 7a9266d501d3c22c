"""Snapshots: a text cache or a stream session saved to a directory and restored exactly.

A snapshot is a directory with ``manifest.json`` (the format version, what was saved, the method and its knobs,
positions and counts, a fingerprint of the model: its config and a checksum of its weights, and the size and
checksum of the tensor file) and ``tensors.safetensors``. No pickle anywhere. It is written into a sibling directory
first and renamed into place, so a reader never sees half a snapshot. ``read`` checks, before anything is built,
that the format is known, the snapshot is of the expected kind and model, and the tensor file is whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import warnings

import torch
from safetensors.torch import load_file, save_file

FORMAT = 1
MANIFEST, TENSORS = "manifest.json", "tensors.safetensors"
_VOLATILE = {"_name_or_path", "transformers_version", "_attn_implementation_autoset", "attn_implementation",
             "_attn_implementation", "_commit_hash"}  # config keys that say nothing about the weights' meaning


class SnapshotError(ValueError):
    """A snapshot that cannot be loaded: another model, an unknown format, a missing, truncated or corrupt file."""


def fingerprint(model: torch.nn.Module) -> dict[str, str]:
    """The model's config (without keys that do not change what it computes) and a checksum of its weights
    (names, dtypes, shapes and bytes of its parameters and buffers), each as a BLAKE2b hex digest."""
    key = tuple((p.data_ptr(), p._version) for p in model.state_dict().values())
    cached = getattr(model, "_livekv_fingerprint", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    config = json.dumps(_stable(model.config.to_dict()), sort_keys=True, default=str)
    weights = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        weights.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        weights.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    result = {"config": hashlib.blake2b(config.encode(), digest_size=16).hexdigest(), "weights": weights.hexdigest()}
    model._livekv_fingerprint = (key, result)
    return result


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in _VOLATILE}
    return value


def write(directory: str | os.PathLike, kind: str, model: torch.nn.Module, meta: dict,
          tensors: dict[str, torch.Tensor]) -> pathlib.Path:
    """Write a snapshot of ``kind`` to ``directory`` (replaced if it exists): ``meta`` goes to the manifest."""
    directory = pathlib.Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_file(_unshared(tensors), tmp / TENSORS)
        manifest = {"format": FORMAT, "kind": kind, "model": fingerprint(model), **meta,
                    "tensors": {"bytes": (tmp / TENSORS).stat().st_size, "blake2b": _checksum(tmp / TENSORS)}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _sync(tmp)
        _replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read(directory: str | os.PathLike, kind: str, model: torch.nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """The manifest and the tensors (on the CPU) of the snapshot of ``kind`` in ``directory``, for ``model``;
    ``SnapshotError`` if it cannot be loaded exactly."""
    directory = pathlib.Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise SnapshotError(f"no snapshot at {directory} (no {MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SnapshotError(f"{directory / MANIFEST} is corrupt: {e}") from None
    if not isinstance(manifest, dict):
        raise SnapshotError(f"{directory / MANIFEST} is not a snapshot's manifest (a JSON object)")
    if manifest.get("format") != FORMAT:
        raise SnapshotError(f"{directory}: snapshot format {manifest.get('format')!r}; this livekv reads format {FORMAT}")
    if manifest.get("kind") != kind:
        raise SnapshotError(f"{directory} holds a {manifest.get('kind')!r} snapshot, not a {kind!r} one")
    mine, theirs = fingerprint(model), manifest.get("model")
    if theirs != mine:
        what = [k for k in mine if not isinstance(theirs, dict) or theirs.get(k) != mine[k]]
        raise SnapshotError(f"{directory} is a snapshot of another model (its {' and '.join(what)} differ)")
    path, expected = directory / TENSORS, manifest.get("tensors")
    expected = expected if isinstance(expected, dict) else {}
    if not path.is_file() or path.stat().st_size != expected.get("bytes") or _checksum(path) != expected.get("blake2b"):
        raise SnapshotError(f"{path} is missing, truncated or corrupt (its size or checksum differs from the manifest)")
    return manifest, load_file(path)


@contextlib.contextmanager
def restoring(directory: str | os.PathLike):
    """Building from a manifest that passed ``read``'s checks: a field missing or of the wrong kind (a manifest
    written by hand, or by someone else) is a ``SnapshotError``, not whatever error building raised."""
    try:
        yield
    except SnapshotError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise SnapshotError(f"{directory}: the manifest does not describe a snapshot this livekv can restore "
                            f"({type(e).__name__}: {e})") from None


def knobs_here(knobs: dict) -> dict:
    """The knobs a snapshot was saved with, for this machine: a disk tier's ``host_dir`` that is gone (the snapshot
    moved, the folder was cleaned) becomes the default temp dir, said in a warning. The tier's contents come from the
    snapshot; only where its file lives changes."""
    host_dir = knobs.get("host_dir")
    if isinstance(host_dir, str) and not os.path.isdir(host_dir):
        warnings.warn(f"the snapshot's host_dir {host_dir!r} is not a directory here: its disk tier goes to the "
                      "temp dir", stacklevel=3)
        return {**knobs, "host_dir": None}
    return knobs


def layer_states(layers: list) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Every layer's ``state()``: its tensors named ``layers.<i>.<name>``, and its metadata, for ``write``."""
    tensors, metas = {}, []
    for i, layer in enumerate(layers):
        layer_tensors, meta = layer.state()
        tensors.update({f"layers.{i}.{k}": v for k, v in layer_tensors.items()})
        metas.append(meta)
    return tensors, metas


def load_layers(layers: list, manifest: dict, tensors: dict[str, torch.Tensor], device) -> None:
    """The layers just built, each given back what ``layer_states`` saved (``SnapshotError`` unless the manifest
    has one entry per layer)."""
    saved = manifest["layers"]
    if not isinstance(saved, list) or len(saved) != len(layers):
        raise SnapshotError(f"the manifest describes {len(saved) if isinstance(saved, list) else 'no'} layers; the "
                            f"model has {len(layers)}")
    for i, (layer, meta) in enumerate(zip(layers, saved)):
        prefix = f"layers.{i}."
        layer.load_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta, device)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing memory with another (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def _checksum(path: pathlib.Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _sync(directory: pathlib.Path) -> None:
    for name in (TENSORS, MANIFEST):
        with open(directory / name, "rb") as f:
            os.fsync(f.fileno())


def _replace(new: pathlib.Path, target: pathlib.Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first and removed after."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    try:
        target.rename(old)
    except FileNotFoundError:  # none (or removed meanwhile: a session deleted while it was saved)
        old = None
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
