"""Validated safetensors reading and writing, and the SHA-256 manifest.

safetensors leaves value checks to the reader and its validation to the library version, so the
engine checks every file itself before using it (reference RELIABILITY §2a): the header length,
duplicate names, dtypes, shape x dtype = byte span, offsets that are contiguous, non-overlapping
and cover the whole file. A file that fails raises CheckpointError naming the file and tensor.

Reading streams one file at a time: `read_tensors` reads the file's bytes once, hashing them as
it goes, and yields CPU tensors; so host memory stays near one shard and the manifest hash is
checked without a second pass over the file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import CheckpointError
from .video import fsync_dir   # one implementation of the atomic-write steps

MAX_HEADER_BYTES = 100_000_000          # the limit the safetensors format itself sets
MANIFEST_NAME = "wanimate-manifest.json"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int            # byte offsets inside the data buffer
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int       # 8 + header length


def _no_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise CheckpointError(f"duplicate tensor name {k!r} in the header")
        seen[k] = v
    return seen


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate a safetensors header; nothing of the data buffer is read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    where = f"{path}"
    if size < 8:
        raise CheckpointError(f"{where}: truncated ({size} bytes; a safetensors file starts with an 8-byte header length)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt or hostile file)")
        if 8 + n > size:
            raise CheckpointError(f"{where}: truncated: header claims {n} bytes but the file has {size - 8}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: tensor {name!r}: malformed header entry {entry!r} ({e})") from None
        if any(s < 0 for s in shape):
            raise CheckpointError(f"{where}: tensor {name!r}: negative dimension in shape {shape}")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{where}: tensor {name!r}: byte span {begin}..{end} does not match "
                                  f"shape {list(shape)} x {entry['dtype']} = {nbytes} bytes")
        tensors[name] = TensorInfo(name, dtype, shape, begin, end)
    # The buffer must be covered exactly once: sorted spans are contiguous from 0 to its end.
    cursor = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin < cursor:
            raise CheckpointError(f"{where}: tensor {info.name!r} overlaps the previous tensor (offset {info.begin} < {cursor})")
        if info.begin > cursor:
            raise CheckpointError(f"{where}: gap before tensor {info.name!r} (offset {info.begin}, expected {cursor})")
        cursor = info.end
    if 8 + n + cursor != size:
        state = "truncated" if 8 + n + cursor > size else "has trailing bytes"
        raise CheckpointError(f"{where}: {state}: header describes {8 + n + cursor} bytes, file has {size}")
    return SafetensorsHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()}, 8 + n)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_tensors(header: SafetensorsHeader, expected_sha256: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Read a validated file once (hashing it when a digest is expected) and yield (name, tensor)
    in file order. With an expected digest nothing is yielded until the whole file is hashed, so a
    tampered file never produces a tensor."""
    path = header.path
    with open(path, "rb") as f:
        data = bytearray(path.stat().st_size)
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            n = f.readinto(view[pos: pos + (1 << 26)])
            if not n:
                raise CheckpointError(f"{path}: file shrank while reading")
            pos += n
    if expected_sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected_sha256:
            raise CheckpointError(f"{path}: SHA-256 {digest} does not match the manifest ({expected_sha256}); "
                                  "the file changed since `wanimate convert` wrote the manifest")
    base = header.data_start
    for info in sorted(header.tensors.values(), key=lambda t: t.begin):
        if info.end == info.begin:
            yield info.name, torch.empty(info.shape, dtype=info.dtype)
            continue
        t = torch.frombuffer(data, dtype=torch.uint8, count=info.end - info.begin, offset=base + info.begin)
        yield info.name, t.view(info.dtype).reshape(info.shape)


def save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file atomically (temp file, fsync, rename); returns its SHA-256."""
    path = Path(path)
    entries, offset = {}, 0
    ordered = sorted(tensors.items())
    for name, t in ordered:
        if t.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"cannot store tensor {name!r} of dtype {t.dtype} in safetensors")
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)          # align the data buffer to 8 bytes
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for block in (struct.pack("<Q", len(header)), header):
                f.write(block)
                h.update(block)
            for _, t in ordered:
                raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
                f.write(raw)
                h.update(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return h.hexdigest()




# ---- the manifest: {relative path: {"sha256": ..., "bytes": ...}} for every file the engine loads


def read_manifest(directory: Path) -> dict[str, dict] | None:
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return {str(k): dict(v) for k, v in data["files"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e}); re-run `wanimate convert {directory}`") from None


def write_manifest(directory: Path, files: dict[str, dict], extra: dict | None = None) -> Path:
    path = Path(directory) / MANIFEST_NAME
    payload = {"format": "wanimate-manifest/1", "files": dict(sorted(files.items())), **(extra or {})}
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(payload, indent=1))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def manifest_hash(directory: Path) -> str | None:
    """A short identity of a checkpoint directory for sidecars: the SHA-256 of its manifest."""
    path = Path(directory) / MANIFEST_NAME
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
