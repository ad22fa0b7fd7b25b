"""TensorRT engines from the exported ONNX graphs: build, cache, verify, run.

Written against the TensorRT 10 Python API. TensorRT is NOT installed on the development or GPU
machines of this project (its wheels are too large), so nothing in this file has run against the
real library: the tests drive every function through a fake `trt` module object passed as the
`trt=` argument (tests/fake_tensorrt.py), which runs the "engine" with ONNX Runtime on host
memory. The engine cache, the key and the hash checks are real code and are tested for real.

Build (`build_engine`)
    Builder -> NetworkDefinition (explicit batch, the only mode in TensorRT 10) -> OnnxParser ->
    BuilderConfig: precision flags ('fp32' strict, 'tf32', 'fp16', 'bf16', 'fp8' = FP8 + FP16
    fallback, compute capability >= 8.9 only; FP8 kernels are only chosen where the ONNX has
    Q/DQ nodes, which our VAE export does not emit), reductions and normalisations pinned to fp32
    (the VAE's RMS norm sums 384 squares), one optimisation profile per dynamic input (the
    preprocessing models' batch), and a timing cache file that persists between builds.

Engine cache (`EngineCache`)
    One file per engine, named by the SHA-256 of its key: model name, ONNX SHA-256, GPU name,
    compute capability, TensorRT version, precision and the profile shapes. Beside it a JSON
    sidecar holds the key and the engine's SHA-256. A serialised engine is executable code
    (RELIABILITY.md §2a), so `load` reads the bytes once, checks the sidecar's key equals the key
    asked for and the bytes' SHA-256 equals the sidecar's, and only then hands them to
    `deserialize_cuda_engine`. A file without a sidecar, a different key or a different hash
    raises EngineIntegrityError; group- or world-writable cache files or folders are refused. The
    sidecar guards against corruption, stale engines and files dropped into the folder; it cannot
    stop someone who can rewrite both files, so the folder must be writable by the owner only.

Runtime (`EngineRunner`)
    Binds torch CUDA tensors by `data_ptr()`: `set_input_shape` for each input, output shapes
    from the context, outputs allocated with torch, `set_tensor_address` for every I/O tensor, and
    `execute_async_v3` on the current torch stream (so no synchronisation is needed with the torch
    work around it).

torch-TensorRT for the DiT blocks (`compile_dit_blocks_tensorrt`): a guarded function, never run
here (no torch_tensorrt on any of our machines).
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..engine.errors import CheckpointError, ValidationError
from .onnx import read_manifest, sha256_file

PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "fp8")
ENGINE_FORMAT = "wanimate-trt-engine"
DEFAULT_WORKSPACE = 8 << 30


class TensorRTError(CheckpointError):
    """TensorRT is missing, or an engine cannot be built or run."""


class EngineIntegrityError(TensorRTError):
    """An engine file is unknown, was changed, or does not match the key asked for: it is not
    deserialised (a serialised engine is executable code)."""


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise TensorRTError("TensorRT is not installed (pip install tensorrt, matching your CUDA); "
                            "use --vae-backend torch or onnx") from None
    return tensorrt


# --------------------------------------------------------------------------------------------
# Keys and the engine cache
# --------------------------------------------------------------------------------------------

Profile = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]   # name -> (min, opt, max)


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; two builds with equal keys are interchangeable."""
    name: str
    onnx_sha256: str
    gpu: str
    compute_capability: str
    tensorrt: str
    precision: str
    profiles: tuple = ()      # ((input, min, opt, max), ...) per profile, sorted by input name

    def as_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))   # tuples -> lists, the form a sidecar holds

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()


def _normalise_profiles(profiles: Profile | Sequence[Profile] | None) -> tuple:
    if not profiles:
        return ()
    if isinstance(profiles, Mapping):
        profiles = [profiles]
    out = []
    for profile in profiles:
        entries = []
        for name in sorted(profile):
            lo, opt, hi = (tuple(int(d) for d in s) for s in profile[name])
            if not (len(lo) == len(opt) == len(hi)) or any(not a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise ValidationError(f"profile for {name}: need min <= opt <= max per dim, got {lo}, {opt}, {hi}")
            entries.append((name, lo, opt, hi))
        out.append(tuple(entries))
    return tuple(out)


def device_identity(device: torch.device | str | None = None) -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') of a CUDA device."""
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise TensorRTError("TensorRT engines need a CUDA device; none is available")
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def make_key(name: str, onnx_path: Path, precision: str, profiles=None, *, trt=None,
             gpu: tuple[str, str] | None = None, device=None) -> EngineKey:
    if precision not in PRECISIONS:
        raise ValidationError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt = trt if trt is not None else import_tensorrt()
    gpu_name, cc = gpu if gpu is not None else device_identity(device)
    return EngineKey(name=name, onnx_sha256=sha256_file(Path(onnx_path)), gpu=gpu_name, compute_capability=cc,
                     tensorrt=str(trt.__version__), precision=precision, profiles=_normalise_profiles(profiles))


def _check_private(path: Path) -> None:
    """Refuse cache files and folders that other users may write (an engine is code)."""
    if os.name != "posix":
        return
    if path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise EngineIntegrityError(f"{path} is writable by other users; chmod go-w it (engines are executable code)")


@dataclass
class CachedEngine:
    path: Path
    key: EngineKey
    engine_bytes: bytes = field(repr=False)


class EngineCache:
    """A folder of engines + JSON sidecars (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path_for(self, key: EngineKey) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in key.name)[:64]
        return self.root / f"{safe}-{key.digest[:24]}.engine"

    @staticmethod
    def sidecar(path: Path) -> Path:
        return path.with_suffix(path.suffix + ".json")

    def store(self, key: EngineKey, engine_bytes: bytes) -> CachedEngine:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        _check_private(self.root)
        path = self.path_for(key)
        record = {"format": ENGINE_FORMAT, "version": 1, "key": key.as_json(), "key_sha256": key.digest,
                  "sha256": hashlib.sha256(engine_bytes).hexdigest(), "size": len(engine_bytes)}
        for target, data in ((path, engine_bytes), (self.sidecar(path), json.dumps(record, indent=1).encode())):
            tmp = target.with_name(target.name + f".partial{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        return CachedEngine(path, key, engine_bytes)

    def verify(self, path: Path, key: EngineKey | None = None) -> CachedEngine:
        """The bytes of an engine file after the sidecar checks; `key=None` accepts the sidecar's
        own key (for a file given by path) but still checks the hash."""
        path = Path(path)
        side = self.sidecar(path)
        if path.is_symlink() or side.is_symlink():
            raise EngineIntegrityError(f"{path}: engine files may not be symlinks")
        if not path.is_file():
            raise EngineIntegrityError(f"{path}: no such engine")
        if not side.is_file():
            raise EngineIntegrityError(f"{path}: unknown engine (no {side.name}); only engines built by "
                                       "wanimate export are loaded: delete it and build again")
        _check_private(path.parent)
        _check_private(path)
        _check_private(side)
        try:
            record = json.loads(side.read_text())
            stored_key = EngineKey(**{k: _tuples(v) for k, v in record["key"].items()})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EngineIntegrityError(f"{side}: unreadable sidecar ({e}); delete the engine and build again") from None
        if record.get("format") != ENGINE_FORMAT or record.get("key_sha256") != stored_key.digest:
            raise EngineIntegrityError(f"{side}: not a valid sidecar; delete the engine and build again")
        if key is not None and stored_key != key:
            diff = {k: (v, getattr(key, k)) for k, v in asdict(stored_key).items() if getattr(key, k) != v}
            raise EngineIntegrityError(f"{path}: built for another key ({sorted(diff)} differ); build again")
        data = path.read_bytes()      # hashed and deserialised from the same bytes: no re-read
        if len(data) != record.get("size") or hashlib.sha256(data).hexdigest() != record.get("sha256"):
            raise EngineIntegrityError(f"{path}: SHA-256 does not match its sidecar; the file was changed, "
                                       "delete it and build again")
        return CachedEngine(path, stored_key, data)

    def lookup(self, key: EngineKey) -> CachedEngine | None:
        """The verified engine for `key`, None if there is none (a bad one raises)."""
        path = self.path_for(key)
        if not path.exists() and not path.is_symlink():
            return None
        return self.verify(path, key)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------

def _set_precision(trt, config, precision: str, compute_capability: str) -> None:
    flags = trt.BuilderFlag
    if precision == "fp32":
        config.clear_flag(flags.TF32)           # strict fp32, comparable with the torch VAE
    elif precision == "fp16":
        config.set_flag(flags.FP16)
    elif precision == "bf16":
        config.set_flag(flags.BF16)
    elif precision == "fp8":
        major, minor = (int(v) for v in compute_capability.split("."))
        if (major, minor) < (8, 9):
            raise ValidationError(f"fp8 engines need compute capability >= 8.9 (Ada/Hopper), this GPU is "
                                  f"{compute_capability}; use fp16 or bf16")
        config.set_flag(flags.FP8)
        config.set_flag(flags.FP16)             # layers without Q/DQ fall back to fp16
    if precision in ("fp16", "bf16", "fp8"):
        config.set_flag(flags.PREFER_PRECISION_CONSTRAINTS)


def _pin_reductions(trt, network) -> int:
    """Keep reductions and normalisations in fp32 under fp16/bf16 flags; returns how many."""
    pinned = 0
    keep = {trt.LayerType.REDUCE, trt.LayerType.NORMALIZATION}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in keep:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def build_engine(onnx_path: Path, *, precision: str = "fp16", profiles=None, timing_cache: Path | None = None,
                 workspace_bytes: int = DEFAULT_WORKSPACE, trt=None, compute_capability: str = "9.0",
                 log_level: str = "WARNING") -> bytes:
    """Serialised engine bytes from an ONNX file (see the module docstring)."""
    from .onnx import check_external_data

    if precision not in PRECISIONS:
        raise ValidationError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt = trt if trt is not None else import_tensorrt()
    onnx_path = Path(onnx_path)
    check_external_data(onnx_path)        # the parser reads external data beside the file
    logger = trt.Logger(getattr(trt.Logger, log_level))
    builder = trt.Builder(logger)
    network = builder.create_network(0)   # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"{onnx_path}: the TensorRT ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    _set_precision(trt, config, precision, compute_capability)
    if precision in ("fp16", "bf16", "fp8"):
        _pin_reductions(trt, network)
    for profile_spec in _normalise_profiles(profiles):
        profile = builder.create_optimization_profile()
        for name, lo, opt, hi in profile_spec:
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"{onnx_path}: TensorRT could not build an engine ({precision}); see its log above")
    if cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = timing_cache.with_name(timing_cache.name + f".partial{os.getpid()}")
        tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
        os.replace(tmp, timing_cache)
    return bytes(memoryview(serialized))


def build_or_load(cache: EngineCache, onnx_path: Path, *, name: str | None = None, precision: str = "fp16",
                  profiles=None, trt=None, device=None, gpu: tuple[str, str] | None = None,
                  **build_options) -> CachedEngine:
    """The verified cached engine for this ONNX file, precision, profiles and GPU; built and
    stored on a miss. The timing cache lives in the cache folder, one per GPU and TensorRT version.
    `gpu` = (name, compute capability) overrides asking torch about `device`."""
    trt = trt if trt is not None else import_tensorrt()
    onnx_path = Path(onnx_path)
    key = make_key(name or onnx_path.stem, onnx_path, precision, profiles, trt=trt, gpu=gpu, device=device)
    found = cache.lookup(key)
    if found is not None:
        return found
    tag = hashlib.sha256(f"{key.gpu}|{key.compute_capability}|{key.tensorrt}".encode()).hexdigest()[:16]
    build_options.setdefault("timing_cache", cache.root / f"timing-{tag}.cache")
    data = build_engine(onnx_path, precision=precision, profiles=profiles, trt=trt,
                        compute_capability=key.compute_capability, **build_options)
    return cache.store(key, data)


def dynamic_batch_profile(model, *, max_batch: int = 16, opt_batch: int | None = None) -> dict:
    """An optimisation profile (min 1, opt, max `max_batch`) for every input of an ONNX model
    (ModelProto) whose dim 0 is symbolic; the other dims must be static."""
    if max_batch < 1:
        raise ValidationError(f"max_batch must be >= 1, got {max_batch}")
    opt = min(max_batch, opt_batch or max_batch)
    inits = {t.name for t in model.graph.initializer}
    profile = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            continue
        rest = []
        for d in dims[1:]:
            if not d.HasField("dim_value"):
                raise ValidationError(f"input {value.name}: only the batch dim may be dynamic")
            rest.append(d.dim_value)
        profile[value.name] = ((1, *rest), (opt, *rest), (max_batch, *rest))
    return profile


def build_vae_engines(export_dir: Path, *, precision: str = "fp16", trt=None, device=None,
                      cache_dir: Path | None = None, **build_options) -> dict[str, str]:
    """Build (or find) the engines of every graph of a VAE export; returns graph -> engine path."""
    manifest = read_manifest(export_dir)
    cache = EngineCache(Path(cache_dir) if cache_dir is not None else Path(export_dir) / "engines")
    out = {}
    for graph, entry in manifest["graphs"].items():
        built = build_or_load(cache, Path(export_dir) / entry["file"], name=f"vae_{graph}",
                              precision=precision, trt=trt, device=device, **build_options)
        out[graph] = str(built.path)
    return out


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.INT32: torch.int32, trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool}
    for name, td in (("BF16", torch.bfloat16), ("INT64", torch.int64), ("UINT8", torch.uint8),
                     ("FP8", torch.float8_e4m3fn)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = td
    if dtype not in table:
        raise TensorRTError(f"engine tensor type {dtype} has no torch equivalent")
    return table[dtype]


class EngineRunner:
    """Runs one deserialised engine on torch tensors (see the module docstring). Not thread
    safe: one execution context, use one runner per thread or stream."""

    def __init__(self, engine_bytes: bytes, *, device: torch.device | str = "cuda", trt=None,
                 log_level: str = "WARNING"):
        self.trt = trt if trt is not None else import_tensorrt()
        self.device = torch.device(device)
        # Real TensorRT reads device pointers; an implementation that runs on host memory (the
        # tests' fake at the TensorRT boundary) declares it with `accepts_host_pointers`.
        if self.device.type != "cuda" and not getattr(self.trt, "accepts_host_pointers", False):
            raise ValidationError(f"TensorRT runs on a CUDA device, got {self.device}")
        self._logger = self.trt.Logger(getattr(self.trt.Logger, log_level))
        self._runtime = self.trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise TensorRTError("TensorRT could not deserialise the engine (built by another TensorRT "
                                "version or for another GPU?); build it again")
        self.context = self.engine.create_execution_context()
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.dtypes: dict[str, torch.dtype] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            self.dtypes[name] = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            if self.engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT:
                self.inputs.append(name)
            else:
                self.outputs.append(name)

    def _stream(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.current_stream(self.device).cuda_stream
        return 0

    def __call__(self, feeds: Mapping[str, Tensor] | Sequence[Tensor]) -> dict[str, Tensor]:
        if not isinstance(feeds, Mapping):
            feeds = dict(zip(self.inputs, feeds))
        missing = set(self.inputs) - set(feeds)
        extra = set(feeds) - set(self.inputs)
        if missing or extra:
            raise ValidationError(f"engine inputs are {self.inputs}; missing {sorted(missing)}, unknown {sorted(extra)}")
        keep = []      # tensors whose memory the engine reads: alive until the call is enqueued
        for name in self.inputs:
            t = feeds[name]
            if t.device != self.device:
                raise ValidationError(f"{name} is on {t.device}, the engine runs on {self.device}")
            if t.dtype != self.dtypes[name]:
                raise ValidationError(f"{name} must be {self.dtypes[name]}, got {t.dtype}")
            t = t.contiguous()
            keep.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise ValidationError(f"{name}: shape {tuple(t.shape)} is outside the engine's profile")
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise TensorRTError(f"{name}: data-dependent output shape {shape} is not supported")
            outs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if not self.context.execute_async_v3(self._stream()):
            raise TensorRTError("TensorRT execute_async_v3 failed; see its log")
        return outs


# --------------------------------------------------------------------------------------------
# torch-TensorRT for the DiT blocks (guarded; not run)
# --------------------------------------------------------------------------------------------

def compile_dit_blocks_tensorrt(dit: torch.nn.Module, example_inputs: Sequence[Tensor], *,
                                precision: str = "bf16", block_attr: str = "blocks"):
    """Compile each DiT block with torch-TensorRT's dynamo frontend (`torch_tensorrt.compile(
    ir='dynamo')`), replacing the blocks in place; `example_inputs` are one block's forward
    arguments. NOT RUN: torch_tensorrt is not installed on any machine of this project, so this
    is untested beyond the guard. torch.compile + our kernels is the measured fast path."""
    try:
        import torch_tensorrt
    except ImportError:
        raise TensorRTError("torch-tensorrt is not installed (pip install torch-tensorrt matching your "
                            "torch); the DiT runs with torch.compile instead") from None
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if precision not in dtypes:
        raise ValidationError(f"precision must be one of {sorted(dtypes)}, got {precision!r}")
    blocks = getattr(dit, block_attr)
    for i in range(len(blocks)):
        blocks[i] = torch_tensorrt.compile(blocks[i], ir="dynamo", inputs=list(example_inputs),
                                           enabled_precisions={dtypes[precision]})
    return dit


__all__ = ["PRECISIONS", "TensorRTError", "EngineIntegrityError", "EngineKey", "EngineCache", "CachedEngine",
           "import_tensorrt", "make_key", "device_identity", "build_engine", "build_or_load",
           "dynamic_batch_profile", "build_vae_engines", "EngineRunner", "compile_dit_blocks_tensorrt"]
