"""A fake `tensorrt` module object for tests (TensorRT cannot be installed on our machines).

It implements the part of the TensorRT 10 Python API that export/tensorrt.py uses and records
what was asked of it. A "serialised engine" is a magic header, the build settings and the ONNX
bytes; "executing" one reads the inputs from the bound host addresses, runs the ONNX graph with
ONNX Runtime and writes the outputs to the bound addresses. So the binding logic (shapes,
addresses, dtypes, profiles) is exercised for real; only the TensorRT boundary is fake. It is
passed as `trt=`; no real module is patched.
"""
from __future__ import annotations

import ctypes
import enum
import json
import types

import numpy as np

MAGIC = b"FAKETRT1"


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class LayerType(enum.Enum):
    CONVOLUTION = 0
    REDUCE = 1
    NORMALIZATION = 2
    ELEMENTWISE = 3
    OTHER = 4


class BuilderFlag(enum.Enum):
    FP16 = 0
    BF16 = 1
    FP8 = 2
    TF32 = 3
    PREFER_PRECISION_CONSTRAINTS = 4


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32,
       DataType.INT64: np.int64, DataType.INT8: np.int8, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8}
_ORT = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF, "tensor(int64)": DataType.INT64,
        "tensor(int32)": DataType.INT32}


def _layer_type(op: str) -> LayerType:
    if op.startswith("Reduce"):
        return LayerType.REDUCE
    if op in ("LayerNormalization", "InstanceNormalization", "GroupNormalization"):
        return LayerType.NORMALIZATION
    if op == "Conv":
        return LayerType.CONVOLUTION
    return LayerType.ELEMENTWISE if op in ("Add", "Mul", "Div", "Sub") else LayerType.OTHER


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, severity=WARNING):
        self.severity = severity


class Layer:
    def __init__(self, name: str, op: str, num_outputs: int):
        self.name, self.op, self.type = name, op, _layer_type(op)
        self.num_outputs = num_outputs
        self.precision = None
        self.output_types: dict[int, DataType] = {}

    def set_output_type(self, index: int, dtype: DataType) -> None:
        self.output_types[index] = dtype


class Network:
    def __init__(self, flags: int):
        self.flags = flags
        self.layers: list[Layer] = []
        self.onnx_bytes: bytes | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, i: int) -> Layer:
        return self.layers[i]


class OnnxParser:
    def __init__(self, network: Network, logger: Logger):
        self.network, self.errors = network, []

    def parse_from_file(self, path: str) -> bool:
        import onnx

        try:
            model = onnx.load(path)
            onnx.checker.check_model(model)
        except Exception as e:   # the real parser reports errors, it does not raise
            self.errors.append(f"parse error: {e}")
            return False
        self.network.onnx_bytes = model.SerializeToString()
        self.network.layers = [Layer(n.name or f"{n.op_type}_{i}", n.op_type, len(n.output))
                               for i, n in enumerate(model.graph.node)]
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]


class TimingCache:
    def __init__(self, data: bytes):
        self.data = bytes(data)

    def serialize(self) -> bytes:
        return self.data


class OptimizationProfile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name, lo, opt, hi) -> None:
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class BuilderConfig:
    def __init__(self):
        self.flags = {BuilderFlag.TF32}      # TensorRT's default
        self.pools: dict = {}
        self.profiles: list[OptimizationProfile] = []
        self.timing_cache: TimingCache | None = None

    def set_flag(self, flag) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag) -> None:
        self.flags.discard(flag)

    def get_flag(self, flag) -> bool:
        return flag in self.flags

    def set_memory_pool_limit(self, pool, size) -> None:
        self.pools[pool] = size

    def add_optimization_profile(self, profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> TimingCache:
        return TimingCache(data)

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> TimingCache | None:
        return self.timing_cache


class Builder:
    def __init__(self, logger: Logger, module):
        self.logger, self.module = logger, module

    def create_network(self, flags: int = 0) -> Network:
        return Network(flags)

    def create_builder_config(self) -> BuilderConfig:
        return BuilderConfig()

    def create_optimization_profile(self) -> OptimizationProfile:
        return OptimizationProfile()

    def build_serialized_network(self, network: Network, config: BuilderConfig):
        if self.module.fail_builds:
            return None
        settings = {"flags": sorted(f.name for f in config.flags),
                    "profiles": [{k: [list(s) for s in v] for k, v in p.shapes.items()} for p in config.profiles],
                    "pinned": [l.name for l in network.layers if l.precision is not None]}
        self.module.builds.append(settings)
        if config.timing_cache is not None:   # a real build adds the tactics it timed
            config.timing_cache.data += b"tactic;"
        header = json.dumps(settings).encode()
        return MAGIC + len(header).to_bytes(4, "little") + header + network.onnx_bytes


class Engine:
    def __init__(self, settings: dict, onnx_bytes: bytes):
        import onnxruntime as ort

        self.settings = settings
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        self.io = [(i.name, TensorIOMode.INPUT, i) for i in self.session.get_inputs()] + \
                  [(o.name, TensorIOMode.OUTPUT, o) for o in self.session.get_outputs()]
        self.profile = {}
        for p in settings["profiles"][:1]:
            self.profile = {k: [tuple(s) for s in v] for k, v in p.items()}

    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    def get_tensor_name(self, i: int) -> str:
        return self.io[i][0]

    def _arg(self, name):
        return next(arg for n, _, arg in self.io if n == name)

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return next(mode for n, mode, _ in self.io if n == name)

    def get_tensor_dtype(self, name: str) -> DataType:
        return _ORT[self._arg(name).type]

    def get_tensor_shape(self, name: str) -> tuple:
        return tuple(d if isinstance(d, int) else -1 for d in self._arg(name).shape)

    def create_execution_context(self):
        return Context(self)


class Context:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.streams: list[int] = []

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(shape)
        want = self.engine.get_tensor_shape(name)
        if len(shape) != len(want) or any(w >= 0 and w != s for w, s in zip(want, shape)):
            return False
        if name in self.engine.profile:
            lo, _, hi = self.engine.profile[name]
            if any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
        elif any(w < 0 for w in want):
            return False                        # a dynamic input with no profile
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        if self.engine.get_tensor_mode(name) == TensorIOMode.INPUT:
            return self.shapes[name]
        batch = next(iter(self.shapes.values()))[0] if self.shapes else 1
        return tuple(batch if d < 0 else d for d in self.engine.get_tensor_shape(name))

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = int(address)
        return True

    def execute_async_v3(self, stream: int) -> bool:
        self.streams.append(stream)
        feeds = {}
        for name, mode, arg in self.engine.io:
            if mode != TensorIOMode.INPUT:
                continue
            dtype = np.dtype(_NP[_ORT[arg.type]])
            shape = self.shapes[name]
            n = int(np.prod(shape)) * dtype.itemsize
            raw = (ctypes.c_char * n).from_address(self.addresses[name])
            feeds[name] = np.frombuffer(bytes(raw), dtype=dtype).reshape(shape)
        outs = self.engine.session.run(None, feeds)
        for (name, mode, _), value in zip([io for io in self.engine.io if io[1] == TensorIOMode.OUTPUT], outs):
            value = np.ascontiguousarray(value)
            if tuple(value.shape) != self.get_tensor_shape(name):
                return False
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        return True


class Runtime:
    def __init__(self, logger: Logger, module):
        self.module = module

    def deserialize_cuda_engine(self, data: bytes):
        data = bytes(data)
        self.module.deserialized.append(len(data))
        if not data.startswith(MAGIC):
            return None
        n = int.from_bytes(data[8:12], "little")
        return Engine(json.loads(data[12:12 + n]), data[12 + n:])


def make_fake_trt(version: str = "10.99.0-fake") -> types.ModuleType:
    """A fresh fake module: `builds` records each build's settings, `deserialized` each engine
    handed to the runtime, `fail_builds = True` makes builds return None."""
    m = types.ModuleType("tensorrt")
    m.__version__ = version
    m.accepts_host_pointers = True
    m.builds, m.deserialized, m.fail_builds = [], [], False
    for cls in (DataType, TensorIOMode, LayerType, BuilderFlag, MemoryPoolType, Logger, OnnxParser):
        setattr(m, cls.__name__, cls)
    m.float32 = DataType.FLOAT
    m.Builder = lambda logger: Builder(logger, m)
    m.Runtime = lambda logger: Runtime(logger, m)
    return m
