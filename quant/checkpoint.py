"""Offline quantization of a DiT checkpoint, and loading the result without a float copy.

`quantize_checkpoint(ckpt_dir, scheme, out_dir)` (the CLI's `wanimate quantize`):
- reads the official or the diffusers layout (engine/loader.py find_dit / diffusers_to_official),
  validating every header, key, shape and dtype first (validate_dit_files), then streams the shards
  one tensor at a time (hashing each file against the source manifest as it goes), so host memory
  stays at one output shard plus a few fp32 copies of the largest tensor. Measured
  (tests/test_quant_checkpoint.py, a 365 MiB fp32 checkpoint, 32 MiB shards, largest tensor 24 MiB
  in fp32): +150 MiB peak RSS = shard + ~5x the largest tensor. At 14B (1 GiB shards, largest
  13824 x 5120 = 270 MiB in fp32): about 1 + 5 x 0.27 = 2.4 GiB, whatever the checkpoint size;
- merges LoRAs on the way (engine/lora.py; in fp32, then quantized or rounded to bf16 once);
- writes `dit-quantized-0000k-of-0000n.safetensors` shards (atomic save_file) whose metadata
  records the format, scheme, QuantConfig and DiTConfig, an index with the weight map and the list
  of quantized modules, and the SHA-256 manifest. The scheme is read from that metadata, never from
  a file name. Everything is written into a hidden sibling directory renamed into place at the end,
  so an interrupted run leaves no half-written output.

`load_quantized_dit(dir, device)` builds the model on the meta device, swaps in empty quantized
modules for the recorded names (quant/api.py convert_for_runtime), validates every key, shape and
dtype from the headers, and assigns the stored fp8/int8/nf4 tensors and scales directly: no bf16
copy of a quantized weight ever exists. On the CPU the tensors are views of the shard bytes, so the
host peak is the file size plus about one shard (measured: file + 104 MiB with 32 MiB shards; at
14B with 1 GiB shards: file + ~1.1 GiB, under the 4 GB budget); loading to a GPU holds one shard
on the host at a time. Measured at the real 14B size (bench/quant_host_memory.py, H200 machine):
quantize +2.44 GiB peak; load to the CPU file + 0.04 GiB; load to the GPU +1.99 GiB on the host.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from ..engine.config import DiTConfig
from ..engine.errors import CheckpointError
from ..engine.loader import (build_dit, check_finite, constant_buffers, diffusers_to_official, find_dit,
                             validate_dit_files)
from ..engine.lora import LoraPatch, load_lora_file, parse_lora
from ..engine.model import WanAnimateDiT
from ..engine.safetensors_io import (DTYPE_NAMES, MANIFEST_NAME, SafetensorsHeader, read_header, read_manifest,
                                     read_tensors, save_file, write_manifest)
from .api import convert_for_runtime
from .config import QuantConfig, select_linears
from .registry import get_scheme

FORMAT = "wanimate-quant/1"
INDEX_NAME = "dit-quantized.index.json"
SHARD_STEM = "dit-quantized"
DEFAULT_SHARD_BYTES = 1 << 30


@dataclass(frozen=True)
class QuantizeResult:
    out_dir: Path
    files: list[str]
    scheme: str
    quantized_modules: int
    bytes_written: int
    loras_merged: int


def is_quantized_dir(directory: Path) -> bool:
    return (Path(directory) / INDEX_NAME).exists()


# ----------------------------------------------------------------------------------------------
# Streaming reads


def stream_file(header: SafetensorsHeader, expected_sha256: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one tensor at a time in file order, each in its own buffer, hashing the
    file as it goes. The hash is checked after the last tensor: callers must not commit anything
    before the iterator is exhausted (quantize_checkpoint writes into a temporary directory)."""
    path = header.path
    digest = hashlib.sha256() if expected_sha256 else None
    with open(path, "rb") as f:
        head = f.read(header.data_start)
        if digest:
            digest.update(head)
        for info in sorted(header.tensors.values(), key=lambda t: t.begin):
            n = info.end - info.begin
            buf = bytearray(n)
            view, pos = memoryview(buf), 0
            while pos < n:
                got = f.readinto(view[pos: pos + (1 << 26)])
                if not got:
                    raise CheckpointError(f"{path}: file shrank while reading tensor {info.name!r}")
                pos += got
            if digest:
                digest.update(buf)
            t = torch.frombuffer(buf, dtype=torch.uint8).view(info.dtype).reshape(info.shape) if n else \
                torch.empty(info.shape, dtype=info.dtype)
            yield info.name, t
    if digest and digest.hexdigest() != expected_sha256:
        raise CheckpointError(f"{path}: SHA-256 {digest.hexdigest()} does not match the manifest ({expected_sha256}); "
                              "the file changed since the manifest was written")


# ----------------------------------------------------------------------------------------------
# Writing


class _ShardWriter:
    def __init__(self, directory: Path, shard_bytes: int, metadata: dict[str, str]):
        self.directory, self.shard_bytes, self.metadata = directory, shard_bytes, metadata
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str], str]] = []          # (temp name, keys, sha256)
        self.bytes_written = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + n > self.shard_bytes:
            self.flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += n

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{SHARD_STEM}-part{len(self.files):05d}.safetensors"
        digest = save_file(self.pending, self.directory / name, metadata=self.metadata)
        self.files.append((name, sorted(self.pending), digest))
        self.bytes_written += (self.directory / name).stat().st_size
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> dict[str, dict]:
        """Rename the parts to -0000k-of-0000n; returns the manifest entries."""
        self.flush()
        n = len(self.files)
        manifest = {}
        self.weight_map = {}
        for i, (tmp, keys, digest) in enumerate(self.files):
            final = f"{SHARD_STEM}-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.directory / tmp, self.directory / final)
            manifest[final] = {"sha256": digest, "bytes": (self.directory / final).stat().st_size}
            self.weight_map.update({k: final for k in keys})
        return manifest


def _dit_config_json(cfg: DiTConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def _dit_config_from_json(text: str) -> DiTConfig:
    data = json.loads(text)
    for k in ("patch_size",):
        data[k] = tuple(data[k])
    return DiTConfig(**data)


def _collect_loras(loras, param_names, cfg) -> LoraPatch | None:
    patch = None
    for item in loras:
        source, strength = item if isinstance(item, tuple) else (item, 1.0)
        state = source if isinstance(source, Mapping) else load_lora_file(Path(source))
        p = parse_lora(state, param_names, cfg, strength)
        patch = p if patch is None else patch + p
    return patch


def quantize_checkpoint(ckpt_dir: Path, scheme: str, out_dir: Path, *, config: QuantConfig | None = None,
                        loras: Sequence[Path | Mapping[str, torch.Tensor] | tuple] = (),
                        float_dtype: torch.dtype = torch.bfloat16, shard_bytes: int = DEFAULT_SHARD_BYTES,
                        overwrite: bool = False, progress: Callable[[str], None] | None = None) -> QuantizeResult:
    """Quantize the DiT of `ckpt_dir` (official or diffusers layout) into `out_dir`. `loras`: paths
    of .safetensors LoRAs or state dicts, optionally as (source, strength) pairs, merged before
    quantizing. Unquantized floating tensors are stored as `float_dtype`."""
    say = progress or (lambda s: None)
    config = (config or QuantConfig(scheme)).replace(scheme=scheme)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir} exists and is not empty; choose another output folder or pass overwrite=True")
    ck = find_dit(ckpt_dir)
    model = build_dit(ck.config)                            # meta: names, shapes, the policy
    validate_dit_files(ck, model)
    names = select_linears(model, config)
    targets = {f"{n}.weight": n for n in names}
    patch = _collect_loras(loras, model.state_dict().keys(), ck.config) if loras else None
    merged: set[str] = set()
    manifest = read_manifest(Path(ckpt_dir)) or {}

    metadata = {"format": FORMAT, "scheme": scheme, "quant_config": config.to_json(),
                "dit_config": _dit_config_json(ck.config)}
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer = _ShardWriter(tmp, shard_bytes, metadata)
        pending: dict = {}
        for i, f in enumerate(ck.files):
            say(f"quantizing {f.name} ({i + 1}/{len(ck.files)})")
            digest = manifest.get(str(f.relative_to(Path(ckpt_dir))), {}).get("sha256")
            pairs = stream_file(read_header(f), expected_sha256=digest)
            if ck.layout == "diffusers":
                pairs = diffusers_to_official(pairs, ck.config, pending)
            for name, t in pairs:
                check_finite(name, t, str(f))
                if patch is not None and name in patch.targets():
                    t = (t.float() + patch.delta(name, tuple(t.shape)))          # fp32, rounded once below
                    merged.add(name)
                if name in targets:
                    prefix = name[: -len("weight")]
                    for k, v in get_scheme(config.scheme_for(targets[name])).quantize(t, config).items():
                        writer.add(prefix + k, v)
                elif t.is_floating_point():
                    writer.add(name, t.to(float_dtype))
                else:
                    writer.add(name, t)
        if pending:
            raise CheckpointError(f"{ck.directory}: face-adapter halves without a partner: {sorted(k for k, _ in pending)}")
        if patch is not None and merged != patch.targets():
            raise CheckpointError(f"LoRA targets not found in the checkpoint: {sorted(patch.targets() - merged)}")
        files = writer.finish()
        index = {"format": FORMAT, "scheme": scheme, "quant_config": json.loads(config.to_json()),
                 "dit_config": json.loads(_dit_config_json(ck.config)), "quantized_modules": names,
                 "module_schemes": {n: config.scheme_for(n) for n in names},
                 "source": {"directory": str(Path(ckpt_dir).resolve()), "layout": ck.layout},
                 "loras_merged": len(loras), "weight_map": writer.weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1))
        write_manifest(tmp, files, extra={"created_by": "wanimate quantize", "scheme": scheme})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {len(files)} shards to {out_dir}")
    return QuantizeResult(out_dir, sorted(files), scheme, len(names), writer.bytes_written, len(loras))


# ----------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class QuantizedCheckpoint:
    directory: Path
    scheme: str
    config: QuantConfig
    dit_config: DiTConfig
    quantized_modules: list[str]
    files: list[Path]


def read_quantized_index(directory: Path) -> QuantizedCheckpoint:
    directory = Path(directory)
    path = directory / INDEX_NAME
    if not path.exists():
        raise CheckpointError(f"{directory}: no {INDEX_NAME}; this is not a `wanimate quantize` output "
                              "(a float checkpoint loads with engine/loader.py load_dit)")
    try:
        index = json.loads(path.read_text())
        if index.get("format") != FORMAT:
            raise CheckpointError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}; re-run `wanimate quantize`")
        config = QuantConfig.from_json(json.dumps(index["quant_config"]))
        dit_config = _dit_config_from_json(json.dumps(index["dit_config"]))
        files = sorted({directory / f for f in index["weight_map"].values()})
        recorded = index.get("module_schemes", {})
        wrong = [n for n, s in recorded.items() if config.scheme_for(n) != s]
        if wrong:
            raise CheckpointError(f"{path}: module_schemes disagree with the recorded QuantConfig for {wrong[:5]}")
        return QuantizedCheckpoint(directory, index["scheme"], config, dit_config, list(index["quantized_modules"]), files)
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable index ({e}); re-run `wanimate quantize`") from None


def _fp8_has_nan(t: torch.Tensor) -> bool:
    return bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any())


def load_quantized_dit(directory: Path, device: torch.device | str = "cpu", *, dtype: torch.dtype = torch.bfloat16,
                       kernel: str | None = None, progress: Callable[[str], None] | None = None) -> WanAnimateDiT:
    """Load a `quantize_checkpoint` output: quantized tensors as stored, every other float tensor as
    `dtype`. `kernel` overrides the recorded QuantConfig.kernel ("reference" forces the emulation)."""
    qc = read_quantized_index(directory)
    config = qc.config if kernel is None else qc.config.replace(kernel=kernel)
    headers = [read_header(f) for f in qc.files]
    for h in headers:
        meta = h.metadata
        if meta.get("format") != FORMAT or meta.get("scheme") != qc.scheme or meta.get("quant_config") != qc.config.to_json():
            raise CheckpointError(f"{h.path}: its metadata (format {meta.get('format')!r}, scheme {meta.get('scheme')!r}) "
                                  f"does not match {INDEX_NAME} (scheme {qc.scheme!r}); the folder mixes two runs")
    model = build_dit(qc.dit_config)
    convert_for_runtime(model, config, qc.quantized_modules, device="meta")
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()}
    quantized_keys = {f"{n}.{k}" for n in qc.quantized_modules
                      for k in model.get_submodule(n)._buffers}
    constants = constant_buffers(model)
    seen: dict[str, str] = {}
    for h in headers:                                   # everything checkable before data moves
        for key, info in h.tensors.items():
            if key in seen:
                raise CheckpointError(f"key {key!r} is stored in two shards: {seen[key]} and {h.path.name}")
            seen[key] = h.path.name
            if key not in expected:
                raise CheckpointError(f"{h.path.name}: unexpected key {key!r}")
            shape, want = expected[key]
            if info.shape != shape:
                raise CheckpointError(f"{h.path.name}: {key}: expected shape {list(shape)}, found {list(info.shape)}")
            if key in quantized_keys and info.dtype != want:
                raise CheckpointError(f"{h.path.name}: {key}: expected {DTYPE_NAMES.get(want, want)}, "
                                      f"found {DTYPE_NAMES.get(info.dtype, info.dtype)}")
    missing = sorted(set(expected) - set(seen) - set(constants))
    if missing:
        raise CheckpointError(f"{directory}: missing keys ({len(missing)}): {', '.join(missing[:20])}")
    manifest = read_manifest(Path(directory)) or {}
    try:
        for i, h in enumerate(headers):
            if progress:
                progress(f"loading {h.path.name} ({i + 1}/{len(headers)})")
            digest = manifest.get(h.path.name, {}).get("sha256")
            if manifest and digest is None:
                raise CheckpointError(f"{h.path}: not in {MANIFEST_NAME}; re-run `wanimate quantize`")
            for key, t in read_tensors(h, expected_sha256=digest):
                if key in quantized_keys:
                    if t.dtype == torch.float8_e4m3fn and _fp8_has_nan(t):
                        raise CheckpointError(f"{h.path}: tensor {key!r} holds NaN codes; the checkpoint is corrupt")
                    if t.dtype == torch.float32:                  # scales
                        check_finite(key, t, str(h.path))
                    value = t.to(device)
                else:
                    check_finite(key, t, str(h.path))
                    if key in constants and not torch.equal(t.float(), constants[key]):
                        raise CheckpointError(f"{h.path}: {key} should be the fixed blur kernel outer([1,3,3,1])^2/64")
                    value = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                _assign(model, key, value)
        for key, value in constants.items():
            if key not in seen:
                _assign(model, key, value.to(device=device, dtype=dtype))
    except BaseException:
        model = None            # nothing half-loaded survives
        raise
    return model.eval().requires_grad_(False)


def _assign(model: nn.Module, name: str, t: torch.Tensor) -> None:
    prefix, _, leaf = name.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    else:
        module._buffers[leaf] = t
