"""Sessions that survive the server: snapshots of live streams and conversations in ``--state-dir``, written at
intervals and on shutdown, read back at start; and snapshots as tar archives for clients to keep and restore.

Layout: ``<state_dir>/streams/<id>/`` (``StreamSession.save``) with ``<id>.json`` beside it (the stream's spec and
counters: where a file source resumes), ``<state_dir>/chats/<id>/`` (``LiveKVCache.save``) with ``<id>.json`` (the
method, knobs and token ids the cache holds). A stream snapshot holds what was ingested: frames still queued are
counted as dropped (a file source re-reads them).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import shutil
import tarfile
import tempfile

from livekv.methods import make_method, names
from livekv.serve.schemas import client_knobs
from livekv.snapshot import MANIFEST, TENSORS, SnapshotError


def write_json(path: pathlib.Path, payload: dict) -> None:
    """Atomically (a sibling file renamed in place)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def stream_record(stream) -> dict:
    """What a restarted server needs besides the session snapshot."""
    return {"id": stream.id, "spec": stream.spec, "counters": dataclasses.asdict(stream.counters),
            "created": stream.created}


def chat_record(chat) -> dict:
    return {"id": chat.id, "method": chat.method, "knobs": chat.knobs, "tokens": chat.tokens}


def saved(state_dir: str | os.PathLike, kind: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """The snapshots of ``kind`` (``streams`` or ``chats``) in ``state_dir``: (snapshot directory, its record file)."""
    root = pathlib.Path(state_dir) / kind
    records = sorted(root.glob("*.json")) if root.is_dir() else []
    return [(root / r.stem, r) for r in records if (root / r.stem / MANIFEST).is_file()]


def file_safe(sid: str) -> bool:
    """Whether a session id can name a file of the state directory (and nothing outside it)."""
    return bool(sid) and "/" not in sid and "\\" not in sid and not sid.startswith(".") and "\0" not in sid


def remove(state_dir: str | os.PathLike, kind: str, sid: str) -> None:
    """Remove the snapshot of the session ``sid`` of ``kind`` (``streams`` or ``chats``) from ``state_dir``."""
    if file_safe(sid):
        root = pathlib.Path(state_dir) / kind
        shutil.rmtree(root / sid, ignore_errors=True)
        (root / f"{sid}.json").unlink(missing_ok=True)


def saved_one(state_dir: str | os.PathLike, kind: str, sid: str) -> tuple[pathlib.Path, pathlib.Path] | None:
    """The snapshot of the one session ``sid`` of ``kind`` in ``state_dir`` (``None`` if there is none)."""
    if not file_safe(sid):
        return None
    record, directory = pathlib.Path(state_dir) / kind / f"{sid}.json", pathlib.Path(state_dir) / kind / sid
    if not record.is_file() or not (directory / MANIFEST).is_file():
        return None
    return directory, record


def to_tar(directory: pathlib.Path, record: dict) -> bytes:
    """A snapshot directory and its record as one tar archive (what ``GET .../snapshot`` returns)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in (MANIFEST, TENSORS):
            tar.add(directory / name, arcname=name)
        data = json.dumps(record).encode()
        info = tarfile.TarInfo("record.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def from_tar(data: bytes, into: pathlib.Path) -> dict:
    """Unpack a snapshot archive into ``into`` (exactly its three regular files, nothing else: no links, no paths);
    returns its record. ``SnapshotError`` for anything else."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
            names = sorted(m.name for m in members)
            if names != sorted([MANIFEST, TENSORS, "record.json"]) or not all(m.isfile() for m in members):
                raise SnapshotError(f"a snapshot archive holds {MANIFEST}, {TENSORS} and record.json, got {names}")
            into.mkdir(parents=True, exist_ok=True)
            for member in members:
                (into / member.name).write_bytes(tar.extractfile(member).read())
    except (tarfile.TarError, EOFError) as e:
        raise SnapshotError(f"not a snapshot archive: {e}") from None
    return json.loads((into / "record.json").read_text())


def check_sent(directory: pathlib.Path, served: tuple[str, ...]) -> None:
    """A stream snapshot a client sent runs a method this server serves (``served``: names or aliases) and does
    not choose what only the server sets (where it writes files): ``ValueError`` otherwise, before it is loaded."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        method = make_method(manifest["method"], context="stream", **manifest["knobs"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # not a session's manifest: loading it says what is wrong
    if type(method) not in {type(make_method(name, context="stream")) for name in served if name in names("stream")}:
        raise ValueError(f"the snapshot's method {method.name!r} is not served here; served: {list(served)}")
    client_knobs({f.name: getattr(method, f.name) for f in dataclasses.fields(method)
                  if getattr(method, f.name) is not None})


def scratch() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="livekv-serve-")
