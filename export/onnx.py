"""ONNX export of the Wan VAE (causal cache as explicit I/O) and ONNX graph surgery for the
preprocessing models, plus safe ONNX loading.

VAE step graphs
    The VAE runs as a stream of steps (engine/vae.py): each causal layer keeps the last frames of
    its input in a `CausalCache`. Every step is exported as its own static-shape graph for one
    resolution and batch 1, with the cache tensors as plain inputs and outputs:

        decode_first : x [1,z,1,h,w]                     -> y [1,3,1,8h,8w],  cache_out_0..N-1
        decode_step  : x [1,z,1,h,w], cache_in_0..N-1    -> y [1,3,4,8h,8w],  cache_out_0..N-1
        encode_first : x [1,3,1,H,W]                     -> y [1,z,1,H/8,W/8], cache_out_0..M-1
        encode_step  : x [1,3,4,H,W], cache_in_0..M-1    -> y [1,z,1,H/8,W/8], cache_out_0..M-1

    The first step is a separate graph, not a flag input: it has no temporal history, and the
    temporal resamplers skip their time conv on it (the output has 1 frame, not 4), so a flag would
    need an If node with two differently shaped branches, which TensorRT handles poorly. The cache
    of the steady step has a fixed shape, so `cache_out_i` of one step feeds `cache_in_i` of the
    next. `x` is the normalised latent (decoder) or pixels in [-1, 1] (encoder); `y` is the raw
    decoder output (not clamped: the runtime clamps, so one graph serves `clamp=True/False`) or
    the normalised latent mean. The graphs are fp32; lower precisions are chosen when a TensorRT
    engine is built from them (export/tensorrt.py).

    Each export directory holds the four graphs and `manifest.json` (config, resolution, tensor
    names/shapes, file and weight SHA-256). `verify_vae_export` streams a clip through the graphs
    with ONNX Runtime and compares against the torch VAE.

Exporters (torch 2.13 here)
    `exporter="torchscript"` (`torch.onnx.export(..., dynamo=False)`) is the default; the step is
    plain tensor code, so tracing is exact. `exporter="dynamo"` (needs the onnxscript package) also
    works; both are run by the tests on the tiny config.

Preprocessing models
    `make_batch_dynamic` turns a fixed-batch ONNX model (the official YOLOv10m [1,3,640,640] ->
    [1,300,6] and ViTPose-H [1,3,256,192] -> [1,133,64,48]) into one with a symbolic batch axis,
    checks it with the ONNX checker and strict shape inference, and (by default) checks with ONNX
    Runtime that a batch of N gives the same result as N single runs.

Loading hygiene (RELIABILITY.md §2a)
    ONNX external data is read from `location` paths relative to the model file. `check_external_data`
    refuses absolute locations, `..`, backslashes, symlinks anywhere on the path and anything that
    resolves outside the model's directory, before ONNX or ONNX Runtime opens those files.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..engine.config import VAEConfig
from ..engine.errors import CheckpointError, ValidationError
from ..engine.vae import WanVAE
from ..engine.vae_fast import VAEStep

OPSET = 17
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "wanimate-vae-steps"
GRAPHS = ("decode_first", "decode_step", "encode_first", "encode_step")


# --------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------

def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def weights_sha256(module: nn.Module) -> str:
    """Hash of a module's state dict (names, dtypes, shapes and bytes), device independent."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)      # 0-d tensors cannot view as bytes
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# VAE steps as pure tensor functions
# --------------------------------------------------------------------------------------------

def step_input_shape(config: VAEConfig, part: str, first: bool, height: int, width: int,
                     batch: int = 1) -> tuple[int, ...]:
    """Shape of `x` for one step at a pixel resolution (height, width)."""
    s = config.stride[1]
    if part == "decode":
        return (batch, config.z_dim, 1, height // s, width // s)
    return (batch, 3, 1 if first else config.stride[0], height, width)


def _check_resolution(config: VAEConfig, height: int, width: int) -> None:
    s = config.stride[1]
    if height < s or width < s or height % s or width % s:
        raise ValidationError(f"resolution {height}x{width} (HxW) must be positive multiples of {s}")


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

def _tensor_spec(name: str, shape: Sequence[int], dtype: str = "float32") -> dict:
    return {"name": name, "shape": [int(d) for d in shape], "dtype": dtype}


def _count_cache_outputs(model: WanVAE, part: str) -> int:
    """How many tensors the cache of `part` holds: one per causal layer, as a step writes them."""
    from ..engine.vae import CausalConv3d, Downsample

    # Causal convs with a time kernel (the Upsample time convs among them: their first step
    # writes a zero history in the same slot) and the temporal Downsamples. `export_vae_onnx`
    # checks this count against the traced graph's outputs.
    half = model.decoder if part == "decode" else model.encoder
    return sum(1 for m in half.modules()
               if (isinstance(m, CausalConv3d) and m.past_frames)
               or (isinstance(m, Downsample) and m.time_conv is not None))


_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64", 7: "int64", 6: "int32"}


def _graph_io(path: Path) -> tuple[list[dict], list[dict]]:
    """Names, static shapes and dtypes of a saved graph's inputs and outputs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}

    def spec(value) -> dict:
        tt = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if any(d < 0 for d in dims):
            raise CheckpointError(f"{path}: {value.name} has a dynamic shape {dims}; the VAE graphs are static")
        return _tensor_spec(value.name, dims, _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type)))

    return ([spec(v) for v in graph.input if v.name not in inits], [spec(v) for v in graph.output])


def _export_graph(step: VAEStep, args: tuple[Tensor, ...], path: Path, input_names: list[str],
                  output_names: list[str], exporter: str, opset: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with torch.no_grad():
        if exporter == "torchscript":
            torch.onnx.export(step, args, str(tmp), dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names,
                              do_constant_folding=True)
        elif exporter == "dynamo":
            try:
                import onnxscript  # noqa: F401  (the dynamo exporter needs it)
            except ImportError:
                raise ValidationError("exporter='dynamo' needs the onnxscript package "
                                      "(pip install onnxscript), or use exporter='torchscript'") from None
            program = torch.onnx.export(step, args, dynamo=True, opset_version=max(opset, 18),
                                        input_names=input_names, output_names=output_names,
                                        external_data=False, optimize=True, verbose=False)
            program.save(str(tmp))
        else:
            raise ValidationError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    os.replace(tmp, path)


def _exportable(model: nn.Module) -> nn.Module:
    """Swap ops the TorchScript exporter lacks for equal ones, on the export copy only.
    'nearest-exact' upsampling by an integer factor picks floor((i + 0.5) / f) = floor(i / f), the
    same source pixel as 'nearest', which every exporter (and TensorRT's Resize) knows."""
    for module in model.modules():
        if isinstance(module, nn.Upsample) and module.mode == "nearest-exact":
            factors = module.scale_factor if isinstance(module.scale_factor, tuple) else (module.scale_factor,)
            if factors and all(f is not None and float(f).is_integer() for f in factors):
                module.mode = "nearest"
    return model


def export_vae_onnx(vae: WanVAE, out_dir: Path, resolution: tuple[int, int], *,
                    parts: Iterable[str] = ("decode", "encode"), exporter: str = "torchscript",
                    opset: int = OPSET, device: torch.device | str | None = None) -> dict:
    """Export the step graphs of `vae` at one pixel resolution (height, width), batch 1, fp32,
    into out_dir (created). Returns the manifest (also written to out_dir/manifest.json).
    `device`: where tracing runs (a GPU makes the real-size export fast); the graphs are the same."""
    if opset < 17:
        raise ValidationError(f"opset {opset} is too old: the exporter needs opset >= 17")
    height, width = (int(v) for v in resolution)
    config = vae.config
    _check_resolution(config, height, width)
    parts = tuple(parts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    # fp32 graphs: TensorRT picks lower precisions itself; a bf16 ONNX would pin them.
    model = _exportable(copy.deepcopy(vae).to(device=device, dtype=torch.float32).eval().requires_grad_(False))
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT, "version": 1,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
        "resolution": [height, width], "batch": 1, "opset": opset, "exporter": exporter,
        "torch": torch.__version__, "weights_sha256": weights_sha256(vae), "graphs": {},
    }
    for part in parts:
        if part not in ("decode", "encode"):
            raise ValidationError(f"parts must be 'decode' and/or 'encode', got {part!r}")
        shapes: list[tuple[int, ...]] = []
        for first in (True, False):
            name = f"{part}_{'first' if first else 'step'}"
            x_shape = step_input_shape(config, part, first, height, width)
            # Example values only steer tracing; scaled like real inputs to keep the trace finite.
            x = torch.randn(x_shape, device=device) * (0.5 if part == "encode" else 1.0)
            cache = [] if first else [torch.randn(s, device=device) * 0.1 for s in shapes]
            inputs = ["x"] + [f"cache_in_{i}" for i in range(len(cache))]
            path = out_dir / f"{name}.onnx"
            n_cache = len(shapes) if not first else _count_cache_outputs(model, part)
            outputs = ["y"] + [f"cache_out_{i}" for i in range(n_cache)]
            _export_graph(VAEStep(model, part, first), (x, *cache), path, inputs, outputs, exporter, opset)
            in_specs, out_specs = _graph_io(path)
            if [o["name"] for o in out_specs] != outputs:
                raise RuntimeError(f"{path}: traced outputs {[o['name'] for o in out_specs]} != {outputs}; "
                                   "the cache layout of engine/vae.py changed, update _count_cache_outputs")
            if first:
                shapes = [tuple(spec["shape"]) for spec in out_specs[1:]]
            manifest["graphs"][name] = {"file": path.name, "sha256": sha256_file(path),
                                        "inputs": in_specs, "outputs": out_specs}
    tmp = out_dir / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out_dir / MANIFEST)
    return manifest


def read_manifest(export_dir: Path) -> dict:
    """The manifest of an export directory, checked for format and that each graph file is there
    with the recorded SHA-256."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} not found: run export_vae(..., format='onnx') into {export_dir}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e}); export again") from None
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != 1:
        raise CheckpointError(f"{path}: not a {MANIFEST_FORMAT} v1 manifest; export again")
    for name, graph in manifest.get("graphs", {}).items():
        file = export_dir / graph["file"]
        if PurePosixPath(graph["file"]).name != graph["file"]:
            raise CheckpointError(f"{path}: graph file {graph['file']!r} must be a plain file name")
        if not file.is_file():
            raise CheckpointError(f"{file} is missing; export again")
        if sha256_file(file) != graph["sha256"]:
            raise CheckpointError(f"{file}: SHA-256 differs from {path}; the file was changed, export again")
    return manifest


def config_from_manifest(manifest: dict) -> VAEConfig:
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in manifest["config"].items()}
    return VAEConfig(**cfg)


# --------------------------------------------------------------------------------------------
# ONNX Runtime sessions and verification
# --------------------------------------------------------------------------------------------

def open_session(path: Path, providers: Sequence | None = None, threads: int | None = None):
    """An ONNX Runtime session for a model file, after the external-data check."""
    import onnxruntime as ort

    path = Path(path)
    check_external_data(path)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=options,
                                    providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:   # onnxruntime raises its own exception types
        raise CheckpointError(f"{path}: ONNX Runtime cannot load it ({e}); export it again") from None


def _rel_l2(got: Tensor, ref: Tensor) -> float:
    got, ref = got.double(), ref.double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300))


def verify_vae_export(vae: WanVAE, export_dir: Path, *, latent: Tensor | None = None,
                      video: Tensor | None = None, frames: int = 3, seed: int = 0) -> dict[str, float]:
    """Stream a clip through the exported graphs with ONNX Runtime (CPU) and compare with
    vae.decode / vae.encode. Returns {'decode_rel_l2': ..., 'encode_rel_l2': ...} for the parts
    present. Random inputs (latent frames, or 1 + 4(frames-1) video frames) unless given."""
    from .runtime import OnnxVAE

    manifest = read_manifest(export_dir)
    height, width = manifest["resolution"]
    backend = OnnxVAE(export_dir)
    g = torch.Generator().manual_seed(seed)
    cfg = vae.config
    s = cfg.stride[1]
    result: dict[str, float] = {}
    model = vae if vae.dtype == torch.float32 else copy.deepcopy(vae).float()
    device = next(model.parameters()).device
    # The reference is strict fp32: on a GPU cuDNN would otherwise run these convs in TF32.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        if "decode_step" in manifest["graphs"]:
            if latent is None:
                latent = torch.randn(1, cfg.z_dim, frames, height // s, width // s, generator=g)
            ref = model.decode(latent.float().to(device), clamp=False).cpu()
            result["decode_rel_l2"] = _rel_l2(backend.decode(latent.cpu(), clamp=False), ref)
        if "encode_step" in manifest["graphs"]:
            if video is None:
                video = (torch.randn(1, 3, 1 + cfg.stride[0] * (frames - 1), height, width, generator=g) * 0.5).clamp(-1, 1)
            ref = model.encode(video.float().to(device)).cpu()
            result["encode_rel_l2"] = _rel_l2(backend.encode(video.cpu()), ref)
    return result


# --------------------------------------------------------------------------------------------
# Loading hygiene: external data
# --------------------------------------------------------------------------------------------

def _all_tensors(graph) -> Iterable:
    """Every TensorProto of a graph, subgraphs (If/Loop/Scan bodies) included."""
    import onnx

    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def _model_tensors(model) -> Iterable:
    yield from _all_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t


def check_external_data(path: Path) -> list[Path]:
    """Refuse an ONNX model whose external data would be read from outside its directory.
    Returns the external files it uses (resolved). Raises CheckpointError naming the tensor."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:   # protobuf decode errors have no common type
        raise CheckpointError(f"{path}: not a readable ONNX model ({e})") from None
    base = path.parent
    base_real = base.resolve()
    used: dict[Path, None] = {}
    for tensor in _model_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        what = f"{path}: tensor {tensor.name!r} has external data at {location!r}"
        if not location:
            raise CheckpointError(f"{what}: no location")
        if "\\" in location or "\0" in location:
            raise CheckpointError(f"{what}: backslashes and NUL are not allowed in a location")
        rel = PurePosixPath(location)
        if rel.is_absolute() or PureWindowsPath(location).anchor:
            raise CheckpointError(f"{what}: absolute locations are refused; keep the data beside the model")
        if any(part == ".." for part in rel.parts):
            raise CheckpointError(f"{what}: '..' is refused; keep the data in the model's directory")
        current = base
        for part in rel.parts:
            current = current / part
            if current.is_symlink():
                raise CheckpointError(f"{what}: {current} is a symlink; copy the data file instead")
        target = current.resolve()
        if base_real not in target.parents:
            raise CheckpointError(f"{what}: resolves outside {base}")
        if not target.is_file():
            raise CheckpointError(f"{what}: {target} is not a regular file")
        size = target.stat().st_size
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else size - offset
        except ValueError:
            raise CheckpointError(f"{what}: offset/length are not integers") from None
        if offset < 0 or length < 0 or offset + length > size:
            raise CheckpointError(f"{what}: offset {offset} + length {length} is outside the {size}-byte file")
        used[target] = None
    return list(used)


def load_onnx(path: Path):
    """onnx.ModelProto with its external data, after `check_external_data`."""
    import onnx

    path = Path(path)
    check_external_data(path)
    model = onnx.load(str(path), load_external_data=False)
    onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    return model


# --------------------------------------------------------------------------------------------
# Dynamic batch for the preprocessing models
# --------------------------------------------------------------------------------------------

def _initializer_names(graph) -> set[str]:
    return {t.name for t in graph.initializer}


def _constant_values(graph) -> dict[str, Any]:
    """name -> (kind, proto) for initializers and Constant node outputs holding a tensor."""
    import onnx

    found: dict[str, Any] = {t.name: ("init", t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    found[node.output[0]] = ("const", node)
    return found


def _batch_dependent(graph, inputs: set[str]) -> set[str]:
    """Names of values computed from the batched inputs (nodes are topologically sorted in a
    valid ONNX graph). A node with a subgraph is taken as dependent if any input is."""
    tainted = set(inputs)
    for node in graph.node:
        if any(i in tainted for i in node.input if i):
            tainted.update(o for o in node.output if o)
    return tainted


def make_batch_dynamic(model, *, dim_name: str = "batch", verify: bool = True, verify_batch: int = 3,
                       rtol: float = 1e-4, atol: float = 1e-5):
    """A copy of a fixed-batch ONNX model (ModelProto or path) with dim 0 of its data inputs and
    outputs made symbolic (`dim_name`).

    Graph surgery: the inputs' and outputs' dim 0 become `dim_name`; stale value_info shapes are
    dropped; each Reshape whose data depends on the inputs and whose constant target shape starts
    with the fixed batch gets -1 there (or 0, "copy the input's dim", when -1 is already used).
    The result must pass the ONNX checker and strict shape inference, and, with `verify`, ONNX
    Runtime must give for a batch of `verify_batch` random inputs the same outputs as the original
    run one item at a time; otherwise CheckpointError (the model then needs a re-export from its
    source with a dynamic batch axis)."""
    import onnx
    from onnx import numpy_helper

    original = load_onnx(model) if isinstance(model, (str, Path)) else model
    m = copy.deepcopy(original)
    graph = m.graph
    inits = _initializer_names(graph)
    data_inputs = [i for i in graph.input if i.name not in inits]
    if not data_inputs:
        raise ValidationError("the model has no data inputs")
    batches = set()
    for value in data_inputs:
        dims = value.type.tensor_type.shape.dim
        if not dims:
            raise ValidationError(f"input {value.name!r} has no shape: cannot find its batch axis")
        batches.add(dims[0].dim_value if dims[0].HasField("dim_value") else None)
    if batches == {None}:
        return m  # already dynamic
    if len(batches) != 1 or None in batches:
        raise ValidationError(f"inputs disagree on the batch size: {sorted(map(str, batches))}")
    fixed = batches.pop()

    for value in list(data_inputs) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == fixed:
            dims[0].Clear()
            dims[0].dim_param = dim_name
    del graph.value_info[:]

    tainted = _batch_dependent(graph, {v.name for v in data_inputs})
    constants = _constant_values(graph)
    users: dict[str, int] = {}
    for node in graph.node:
        for i in node.input:
            users[i] = users.get(i, 0) + 1
    rewritten = 0
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[0] not in tainted:
            continue
        allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
        shape_name = node.input[1]
        if shape_name not in constants:
            continue
        kind, proto = constants[shape_name]
        tensor = proto if kind == "init" else next(a.t for a in proto.attribute if a.name == "value")
        shape = numpy_helper.to_array(tensor).astype(np.int64).reshape(-1)
        if not len(shape) or shape[0] != fixed:
            continue
        if -1 not in shape:
            shape[0] = -1
        elif not allowzero:
            shape[0] = 0
        else:
            continue
        new_name = f"{shape_name}__dynbatch{rewritten}"
        graph.initializer.append(numpy_helper.from_array(shape, new_name))
        node.input[1] = new_name
        rewritten += 1
        users[shape_name] -= 1
        if users[shape_name] == 0 and kind == "init":
            graph.initializer.remove(proto)

    try:
        onnx.checker.check_model(m, full_check=True)
        m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    except Exception as e:   # onnx raises ValidationError/InferenceError from its C++ core
        raise CheckpointError(f"the model is not valid with a dynamic batch ({e}); "
                              "re-export it from its source with a dynamic batch axis") from None
    if verify:
        check_batch_equivalence(original, m, batch=verify_batch, rtol=rtol, atol=atol)
    return m


def _session_from_proto(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                providers=["CPUExecutionProvider"])


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def check_batch_equivalence(single, batched, *, batch: int = 3, rtol: float = 1e-4, atol: float = 1e-5,
                            seed: int = 0) -> None:
    """ONNX Runtime: `batched` on N random items == `single` on each item alone. CheckpointError if not."""
    rng = np.random.default_rng(seed)
    s1, sb = _session_from_proto(single), _session_from_proto(batched)
    feeds_b: dict[str, np.ndarray] = {}
    for inp in s1.get_inputs():
        if inp.type not in _ORT_TYPES or any(not isinstance(d, int) for d in inp.shape):
            raise ValidationError(f"cannot make random inputs for {inp.name} {inp.type} {inp.shape}")
        feeds_b[inp.name] = rng.standard_normal((batch, *inp.shape[1:])).astype(_ORT_TYPES[inp.type])
    try:
        got = sb.run(None, feeds_b)
    except Exception as e:   # onnxruntime raises its own exception types
        raise CheckpointError(f"the dynamic-batch model fails on a batch of {batch} ({e}); re-export it "
                              "from its source with a dynamic batch axis") from None
    for i in range(batch):
        ref = s1.run(None, {k: v[i:i + 1] for k, v in feeds_b.items()})
        for out, r, g in zip(s1.get_outputs(), ref, got):
            if g.shape[0] != batch or not np.allclose(g[i:i + 1], r, rtol=rtol, atol=atol):
                raise CheckpointError(f"output {out.name}: item {i} of a batch of {batch} differs from a "
                                      "single run; the graph mixes batch items (re-export it from its "
                                      "source with a dynamic batch axis; if only near-tied top-k scores "
                                      "swapped places, check with real inputs and pass verify=False)")


def export_pose(det_onnx: Path | None, pose_onnx: Path | None, out_dir: Path, *, format: str = "onnx",
                precision: str = "fp16", max_batch: int = 16, verify: bool = True, **engine_options) -> dict:
    """Make the preprocessing models' batch dynamic (YOLOv10m detector, ViTPose-H whole-body)
    and write them to out_dir as det.onnx / pose.onnx (+ TensorRT engines with format='tensorrt').
    Returns {'det': {...}, 'pose': {...}} with the written paths."""
    import onnx

    if format not in ("onnx", "tensorrt"):
        raise ValidationError(f"format must be 'onnx' or 'tensorrt', got {format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict] = {}
    for name, src in (("det", det_onnx), ("pose", pose_onnx)):
        if src is None:
            continue
        model = make_batch_dynamic(load_onnx(Path(src)), verify=verify)
        path = out_dir / f"{name}.onnx"
        tmp = path.with_name(path.name + ".partial")
        onnx.save_model(model, str(tmp))
        os.replace(tmp, path)
        entry: dict[str, Any] = {"onnx": str(path), "sha256": sha256_file(path)}
        if format == "tensorrt":
            from .tensorrt import EngineCache, build_or_load, dynamic_batch_profile

            cache = EngineCache(out_dir / "engines")
            profile = dynamic_batch_profile(model, max_batch=max_batch)
            entry["engine"] = str(build_or_load(cache, path, precision=precision, profiles=profile,
                                                **engine_options).path)
        written[name] = entry
    return written


def export_vae(ckpt_dir_or_recipe, out_dir: Path, *, format: str = "onnx", precision: str = "fp32",
               resolution: tuple[int, int] | Sequence[tuple[int, int]] = (480, 832),
               parts: Iterable[str] = ("decode", "encode"), exporter: str = "torchscript",
               device: str | None = None, verify: bool = True, **engine_options) -> list[dict]:
    """Export the VAE step graphs for one or more pixel resolutions (height, width) into
    out_dir/<H>x<W>/ and, with format='tensorrt', build engines from them.

    `ckpt_dir_or_recipe`: a checkpoint folder (its converted VAE), a WanVAE, or 'recipe:<preset>'
    / 'recipe:<preset>:<seed>' for recipe weights (the tiny preset needs no checkpoint).
    With `verify`, each export is streamed through ONNX Runtime and compared with the torch VAE
    (a short clip; slow on a CPU at real sizes). Returns one manifest per resolution."""
    if format not in ("onnx", "tensorrt"):
        raise ValidationError(f"format must be 'onnx' or 'tensorrt', got {format!r}")
    vae = load_vae_source(ckpt_dir_or_recipe)
    resolutions = [resolution] if isinstance(resolution[0], int) else list(resolution)
    manifests = []
    for h, w in resolutions:
        d = Path(out_dir) / f"{h}x{w}"
        manifest = export_vae_onnx(vae, d, (h, w), parts=parts, exporter=exporter, device=device)
        if verify:
            errors = verify_vae_export(vae, d, frames=2)
            manifest["verified_rel_l2"] = errors
            bad = {k: v for k, v in errors.items() if not v <= 1e-4}
            if bad:
                raise CheckpointError(f"{d}: the ONNX graphs differ from the torch VAE (rel L2 {bad}); "
                                      "try exporter='torchscript' or report the bug")
            (d / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if format == "tensorrt":
            from .tensorrt import build_vae_engines
            manifest["engines"] = build_vae_engines(d, precision=precision, **engine_options)
        manifests.append(manifest)
    return manifests


def load_vae_source(source) -> WanVAE:
    """A WanVAE from a WanVAE, a checkpoint folder, or 'recipe:<preset>[:<seed>]'."""
    if isinstance(source, WanVAE):
        return source.eval()
    text = str(source)
    if text.startswith("recipe:"):
        from ..engine.components import _meta, recipe_module
        from ..engine.config import preset

        fields = text.split(":")
        cfg = preset(fields[1] if len(fields) > 1 and fields[1] else "tiny")
        seed = int(fields[2]) if len(fields) > 2 else (cfg.recipe_seed if cfg.recipe_seed is not None else 1234)
        return recipe_module(_meta(lambda: WanVAE(cfg.vae)), seed)
    from ..engine.components import load_vae

    return load_vae(Path(text))


__all__ = ["OPSET", "GRAPHS", "VAEStep", "step_input_shape", "export_vae_onnx", "export_vae",
           "export_pose", "read_manifest", "config_from_manifest", "verify_vae_export", "open_session",
           "check_external_data", "load_onnx", "make_batch_dynamic", "check_batch_equivalence",
           "sha256_file", "weights_sha256", "load_vae_source"]

