"""`wanimate bench`: every stage of a request timed on random weights at the real 14B size.

    python -m wanimate.bench.bench [--resolution 480p|720p] [--steps 20] [--frames 77] [--dtype bf16]
        [--quant fp8] [--vram-budget 24GB] [--compare diffusers] [--e2e-steps 1] [--reps 3]
        [--attention sdpa] [--smoke] [--out DIR]

Stages: T5 (both prompts), CLIP (one image), VAE encode and VAE decode of one 77-frame segment,
DiT prepare (motion encoder + context projection, once per segment) and one DiT step; from those,
an end-to-end segment (2 VAE encodes, prepare, `steps` DiT steps, the decode; T5+CLIP once per
request, reported apart) and GPU-seconds per second of output video (76 new frames per segment at
30 fps). With --e2e-steps N a real one-segment `Pipeline.generate` with N steps is timed too, to
check the per-stage estimate against the real thing.

Weights are random (built on meta, `to_empty` on the device, normal init), so no checkpoint is
needed; timings do not depend on the values. Each time is the median of `--reps` repeats after one
warm-up, taken with CUDA events. "% ceiling" = the stage's ideal time (its GEMM, convolution and
attention FLOPs, counted by torch's FlopCounterMode during the warm-up, each divided by the
ceiling measured in this same run: a large bf16/fp16/TF32/FP8 matmul and SDPA at the DiT's token
count) over the measured time. Peak VRAM = torch.cuda.max_memory_allocated within the stage.

--vram-budget plans with engine.offload.plan_vram, applies the plan and caps the process with
torch.cuda.set_per_process_memory_fraction, so the numbers are those of a card of that size.
--compare diffusers then times diffusers' WanAnimateTransformer3DModel (same config) and
AutoencoderKLWan in this process, without the cap, and reports the ratios. --smoke runs the
tiny preset on the CPU (every code path, toy sizes) for tests.

Writes bench_<...>.json (and .png with matplotlib) to --out, else $OUT, else ./bench_out.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from wanimate.engine.errors import ResourceExhausted

VIDEO_FPS = 30                       # the official sample_fps (reference NOTES §1)
SMOKE_SIZE, SMOKE_FRAMES = (32, 32), 5


# ----------------------------------------------------------------------------------------------
# Random weights at the real size


def init_random_(module: nn.Module, seed: int, std: float | None = 0.02) -> nn.Module:
    """In place: matrices ~ N(0, std) (std=None: 0.5/sqrt(fan_in), for the convolutional VAE),
    biases 0, other vectors 1 (norm scales), the motion encoder's blur kernels their fixed values."""
    from wanimate.engine.loader import constant_buffers

    device = next(module.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                s = std if std is not None else 0.5 / math.sqrt(p[0].numel())
                if p.dtype.is_floating_point and p.element_size() >= 2:
                    p.normal_(0.0, s, generator=g)
                else:
                    p.copy_(torch.randn(p.shape, generator=g, device=device).mul_(s))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for name, value in constant_buffers(module).items():
            module.get_buffer(name).copy_(value)
    return module


def build_random(factory: Callable[[], nn.Module], device, dtype: torch.dtype, seed: int, std=0.02,
                 keep_fp32: tuple[str, ...] = ()) -> nn.Module:
    """Build on meta, cast there (free), materialise on the device in its final dtype, fill.
    Parameters under a module named in keep_fp32 stay fp32 (diffusers' _keep_in_fp32_modules)."""
    with torch.device("meta"):
        module = factory()
    module = module.to(dtype)
    for name, p in [*module.named_parameters(), *module.named_buffers()]:
        if keep_fp32 and any(k in name.split(".") for k in keep_fp32) and p.is_floating_point():
            p.data = p.data.float()
    module = module.to_empty(device=device)
    return init_random_(module, seed, std).eval().requires_grad_(False)


def fill_diffusers_buffers_(model: nn.Module) -> None:
    """to_empty leaves buffers uninitialised; diffusers' WanAnimate model has two kinds, both
    functions of the module's settings: the RoPE tables (rebuilt from the same module class) and
    the motion encoder's blur kernels. Anything else raises, so a new buffer cannot stay garbage."""
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    blur = torch.outer(k, k) / 64.0     # MotionConv2d blur_kernel=(1, 3, 3, 1), no upsampling, in WanAnimate
    with torch.no_grad():
        for name, module in model.named_modules():
            own = dict(module.named_buffers(recurse=False))
            if not own:
                continue
            if type(module).__name__ == "WanRotaryPosEmbed":
                fresh = dict(type(module)(module.attention_head_dim, module.patch_size,
                                          module.max_seq_len).named_buffers())
                for key, buf in own.items():
                    buf.copy_(fresh[key])
            elif set(own) == {"blur_kernel"} and own["blur_kernel"].shape == (4, 4):
                own["blur_kernel"].copy_(blur)
            else:
                raise RuntimeError(f"diffusers buffer(s) {sorted(own)} of {name} ({type(module).__name__}) "
                                   "would stay uninitialised")


def build_pipeline(cfg, device, dtype: torch.dtype):
    from wanimate.engine.clip import CLIPVisual
    from wanimate.engine.model import WanAnimateDiT
    from wanimate.engine.pipeline import Pipeline
    from wanimate.engine.text import ByteTokenizer, T5Encoder
    from wanimate.engine.vae import WanVAE

    small = torch.float32 if dtype == torch.float32 else torch.float16
    dit = build_random(lambda: WanAnimateDiT(cfg.dit), device, dtype, 1)
    t5 = build_random(lambda: T5Encoder(cfg.t5), device, dtype, 2)
    clip = build_random(lambda: CLIPVisual(cfg.clip), device, small, 3)
    vae = build_random(lambda: WanVAE(cfg.vae), device, torch.float32, 4, std=None)
    return Pipeline(dit, vae, clip, text_encoder=t5, tokenizer=ByteTokenizer.for_config(cfg.t5), device=device)


# ----------------------------------------------------------------------------------------------
# Timing, FLOPs, ceilings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_median(fn: Callable[[], object], device: torch.device, reps: int) -> tuple[float, list[float]]:
    """Median seconds of `reps` calls (the caller has warmed up)."""
    from wanimate.bench.timing import time_calls
    times = time_calls(fn, device, reps)
    return statistics.median(times), times


def classify_flops(counts: dict) -> dict:
    """FlopCounterMode's per-op counts -> {gemm, conv, attention, fp8_gemm}."""
    out = {"gemm": 0, "conv": 0, "attention": 0, "fp8_gemm": 0}
    for op, n in counts.items():
        name = str(op)
        if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
            out["attention"] += n
        elif "convolution" in name:
            out["conv"] += n
        elif "_scaled_mm" in name:
            out["fp8_gemm"] += n
        else:
            out["gemm"] += n
    return out


def dit_attention_flops(cfg, tokens: int, batch: int = 1) -> int:
    """Attention FLOPs of one DiT forward (QK^T and PV, 2 FLOPs per MAC): self-attention over all
    tokens and cross-attention to text + CLIP tokens in every block; the face blocks' attention to 5
    motion tokens per frame is negligible. Used when FlopCounterMode does not know the SDPA kernel."""
    per_block = 4 * tokens * (tokens + cfg.text_len + cfg.image_tokens) * cfg.dim
    return batch * cfg.num_layers * per_block


def count_flops(fn: Callable[[], object]) -> tuple[object, dict[str, int]]:
    from torch.utils.flop_counter import FlopCounterMode

    mode = FlopCounterMode(display=False)
    with mode:
        out = fn()
    return out, classify_flops(mode.get_flop_counts().get("Global", {}))


def measure_ceilings(device: torch.device, tokens: int, smoke: bool, fp8: bool, log) -> dict[str, float]:
    """FLOP/s of a large matmul per dtype, SDPA at the DiT's token count, and copy bandwidths."""
    n = 512 if smoke else 8192
    reps = 3 if smoke else 10
    out: dict[str, float] = {}

    def gemm(dtype, tf32=False):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            a @ b
            _sync(device)
            s, _ = time_median(lambda: a @ b, device, reps)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        return 2 * n**3 / s

    out["gemm_bf16"] = gemm(torch.bfloat16)
    out["gemm_fp16"] = gemm(torch.float16)
    out["gemm_tf32"] = gemm(torch.float32, tf32=True)
    out["gemm_fp32"] = out["gemm_tf32"] if device.type != "cuda" else gemm(torch.float32)
    if fp8 and device.type == "cuda" and hasattr(torch, "float8_e4m3fn"):
        try:
            a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
            b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
            one = torch.ones((), device=device)
            f = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)
            f()
            s, _ = time_median(f, device, reps)
            out["gemm_fp8"] = 2 * n**3 / s
        except (RuntimeError, TypeError) as e:
            log(f"  fp8 GEMM ceiling unavailable: {e}")
    heads, d = (2, 64) if smoke else (40, 128)
    L = min(tokens, 512 if smoke else 32760)
    q, k, v = (torch.randn(1, heads, L, d, device=device, dtype=torch.bfloat16) for _ in range(3))
    f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    f()
    s, _ = time_median(f, device, 3 if smoke else 5)
    out["sdpa_bf16"] = 4 * L * L * d * heads / s
    del q, k, v
    if device.type == "cuda":
        nbytes = 1 << 30
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dev.copy_(host, non_blocking=True)
        s, _ = time_median(lambda: dev.copy_(host, non_blocking=True), device, 5)
        out["h2d_pinned_Bps"] = nbytes / s
        other = torch.empty_like(dev)
        s, _ = time_median(lambda: other.copy_(dev), device, 5)
        out["d2d_Bps"] = 2 * nbytes / s            # read + write
        del host, dev, other
    return out


def ideal_seconds(flops: dict[str, int], ceilings: dict[str, float], gemm_dtype: str) -> float | None:
    """Each FLOP class at its measured ceiling; convolutions at the GEMM ceiling of their dtype."""
    gemm = ceilings.get(f"gemm_{gemm_dtype}")
    total = 0.0
    for kind, ceiling in (("gemm", gemm), ("conv", gemm), ("attention", ceilings.get("sdpa_bf16")),
                          ("fp8_gemm", ceilings.get("gemm_fp8"))):
        if flops.get(kind):
            if not ceiling:
                return None
            total += flops[kind] / ceiling
    return total or None


# ----------------------------------------------------------------------------------------------
# GPU telemetry (optional)


class Telemetry:
    """nvidia-ml-py readings (clocks, power, temperature, memory) when it is installed."""

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:                                   # noqa: BLE001 - telemetry is optional
            self.handle = None

    def read(self) -> dict:
        if self.handle is None:
            return {}
        n, h = self.nvml, self.handle
        out = {}
        for key, f in (("sm_clock_mhz", lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
                       ("mem_clock_mhz", lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM)),
                       ("power_w", lambda: n.nvmlDeviceGetPowerUsage(h) / 1000),
                       ("temp_c", lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
                       ("nvml_used_gib", lambda: n.nvmlDeviceGetMemoryInfo(h).used / 2**30)):
            try:
                out[key] = round(float(f()), 1)
            except Exception:                               # noqa: BLE001
                pass
        return out

    def static(self) -> dict:
        if self.handle is None:
            return {}
        n, h = self.nvml, self.handle
        out = {}
        for key, f in (("name", lambda: n.nvmlDeviceGetName(h)), ("driver", n.nvmlSystemGetDriverVersion),
                       ("power_limit_w", lambda: n.nvmlDeviceGetPowerManagementLimit(h) / 1000),
                       ("max_sm_clock_mhz", lambda: n.nvmlDeviceGetMaxClockInfo(h, n.NVML_CLOCK_SM))):
            try:
                v = f()
                out[key] = v.decode() if isinstance(v, bytes) else v
            except Exception:                               # noqa: BLE001
                pass
        return out


# ----------------------------------------------------------------------------------------------
# Rows


@dataclass
class Row:
    stage: str
    seconds: float | None = None
    ideal_s: float | None = None
    peak_gib: float | None = None
    reserved_gib: float | None = None
    note: str = ""
    flops: dict = field(default_factory=dict)
    times: list = field(default_factory=list)
    telemetry: dict = field(default_factory=dict)
    estimate_s: float | None = None

    @property
    def ceiling_pct(self) -> float | None:
        if self.seconds and self.ideal_s:
            return 100.0 * self.ideal_s / self.seconds
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ceiling_pct"] = self.ceiling_pct
        return d


class Runner:
    """Measures stages: warm-up (with FLOP counting), timed repeats, peak memory; an
    out-of-memory error becomes a row saying so and the run continues."""

    def __init__(self, device: torch.device, ceilings: dict, reps: int, telemetry: Telemetry, log):
        self.device, self.ceilings, self.reps, self.telemetry, self.log = device, ceilings, reps, telemetry, log
        self.rows: list[Row] = []

    def stage(self, name: str, fn: Callable[[], object], gemm_dtype: str, reps: int | None = None,
              note: str = "", warmup: bool = True, quiet: bool = False, attention_flops: int = 0) -> Row:
        row = Row(name, note=note)
        failure = None
        try:
            if warmup:
                self._reset_peak()
                _, row.flops = count_flops(fn)               # warm-up, FLOPs counted
                if attention_flops and not row.flops.get("attention"):
                    row.flops["attention"] = attention_flops  # the counter does not know this SDPA kernel
                    row.flops["attention_from"] = "formula"
                _sync(self.device)
            self._reset_peak()
            row.seconds, row.times = time_median(fn, self.device, self.reps if reps is None else reps)
            row.peak_gib, row.reserved_gib = self._peak()
            row.ideal_s = ideal_seconds(row.flops, self.ceilings, gemm_dtype)
            row.telemetry = self.telemetry.read()
        except torch.cuda.OutOfMemoryError as e:
            failure = str(e).split("\n")[0]
        except ResourceExhausted as e:                        # generate() turns its own OOM into this
            failure = str(e)
        if failure is not None:
            recover(self.device)
            row.note = f"out of memory: {failure}"
        self.rows.append(row)
        if not quiet:
            self.log(format_row(row))
        return row

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        self.log(format_row(row))
        return row

    def _reset_peak(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _peak(self):
        if self.device.type != "cuda":
            return None, None
        return (torch.cuda.max_memory_allocated(self.device) / 2**30, torch.cuda.max_memory_reserved(self.device) / 2**30)


def recover(device: torch.device) -> None:
    from wanimate.engine.offload import release_memory
    release_memory(device)


def format_row(row: Row) -> str:
    def f(v, spec, unit):
        return format(v, spec) + unit if v is not None else " " * (len(format(0.0, spec)) + len(unit))
    return (f"{row.stage:48s} {f(row.seconds, '10.4f', ' s')} {f(row.ceiling_pct, '7.1f', ' %')} "
            f"{f(row.peak_gib, '8.2f', ' GiB')}  {row.note}")


def format_table(rows: list[Row]) -> str:
    head = f"{'stage':48s} {'time':>12s} {'ceiling':>9s} {'peak VRAM':>12s}  note"
    return "\n".join([head, "-" * len(head)] + [format_row(r) for r in rows])


# ----------------------------------------------------------------------------------------------
# The benchmark


def _resolve(resolution: str, frames: int, smoke: bool):
    from wanimate.engine.offload import parse_resolution
    if smoke:
        return SMOKE_SIZE, SMOKE_FRAMES
    return parse_resolution(resolution), frames


def _env(device: torch.device, telemetry: Telemetry) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "host": platform.node(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 2), capability=f"{p.major}.{p.minor}",
                   cuda=torch.version.cuda)
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    env.update(telemetry.static())
    return env


def _set_attention(model: nn.Module, backend: str) -> None:
    from wanimate.engine.attention import get_backend
    get_backend(backend)                                     # validates (ValidationError names the options)
    for m in model.modules():
        if hasattr(m, "backend") and isinstance(m.backend, str):
            m.backend = backend


def _dit_inputs(cfg, size, frames, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = size[0] // 8, size[1] // 8
    lat_t = (frames - 1) // 4 + 1
    r = lambda *s: torch.randn(*s, generator=g)
    return dict(
        y=r(1, 20, lat_t + 1, h, w).to(device, dtype),
        pose=r(1, 16, lat_t, h, w).to(device, dtype),
        face=(torch.rand(1, 3, frames, cfg.motion_size, cfg.motion_size, generator=g) * 2 - 1).to(device, dtype),
        context=[r(30, cfg.text_dim).to(device, dtype)],
        clip=r(1, cfg.image_tokens, cfg.image_dim).to(device, dtype),
        latents=r(1, 16, lat_t + 1, h, w).to(device),
        t=torch.tensor([500], device=device),
    )


def run_bench(*, resolution: str = "480p", steps: int = 20, frames: int = 77, dtype: str = "bf16",
              quant: str | None = None, vram_budget: str | int | None = None, compare: tuple[str, ...] = (),
              smoke: bool = False, device: str | None = None, reps: int = 3, e2e_steps: int = 1,
              attention: str | None = None, plot: bool = True, out: str | Path | None = None,
              memory_model: str | Path | None = None, log: Callable[[str], None] = print,
              kernels: bool = False, vae_backend: str = "torch") -> dict:
    """Run the benchmark; returns the result dict (also written as JSON). See the module docstring.
    `kernels`: the fused Triton kernels (engine/transforms.py use_kernels); `vae_backend`: 'compiled'
    for the torch.compile'd VAE steps (export/runtime.py)."""
    from wanimate.engine.config import preset
    from wanimate.engine.errors import ValidationError
    from wanimate.engine.offload import (MemoryModel, _dtype_name, apply_plan, dit_tokens, parse_budget,
                                         plan_vram, quant_available)

    dname = _dtype_name(dtype)
    torch_dtype = getattr(torch, dname)
    device = torch.device(device or ("cpu" if smoke or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    for c in compare:
        if c != "diffusers":
            raise ValidationError(f"--compare takes 'diffusers', got {c!r}")
    cfg = preset("tiny" if smoke else "14b")
    size, frames = _resolve(resolution, frames, smoke)
    tokens = dit_tokens(cfg.dit, size, frames)
    telemetry = Telemetry(device)
    notes: list[str] = []
    result = {"env": _env(device, telemetry),
              "config": {"preset": cfg.name, "resolution": resolution if not smoke else "smoke", "size_hw": size,
                         "frames": frames, "steps": steps, "dtype": dname, "quant": quant,
                         "vram_budget": vram_budget, "tokens": tokens, "reps": reps, "attention": attention or "sdpa"},
              "notes": notes}
    log(f"wanimate bench: {cfg.name} at {size[1]}x{size[0]}, {frames} frames ({tokens} DiT tokens), {dname}"
        f"{' + ' + quant if quant else ''} on {device}")
    quant_ok = quant is None or quant_available()
    if not quant_ok:
        notes.append(f"--quant {quant}: wanimate.quant is not in this tree; the {quant} rows are skipped")
        log("note: " + notes[-1])

    t0 = time.perf_counter()
    ceilings = measure_ceilings(device, tokens, smoke, fp8=bool(quant and quant_ok), log=log)
    result["ceilings"] = ceilings
    log("ceilings: " + ", ".join(f"{k} {v / 1e12:.1f} T" if "gemm" in k or "sdpa" in k else f"{k} {v / 1e9:.1f} G"
                                 for k, v in ceilings.items()))
    pipe = build_pipeline(cfg, device, torch_dtype)
    if attention:
        _set_attention(pipe.dit, attention)
    if kernels:
        from wanimate.engine.transforms import use_kernels
        notes.append(f"fused kernels: {'on' if use_kernels(pipe.dit) else 'unavailable (reference path)'}")
    if vae_backend != "torch":
        from wanimate.export.runtime import make_vae_backend
        pipe.vae = make_vae_backend(pipe.vae, vae_backend)
        notes.append(f"VAE backend: {vae_backend}")
    log(f"built random weights in {time.perf_counter() - t0:.1f} s")

    mem = MemoryModel.from_json(memory_model) if memory_model else MemoryModel()
    placement, budget = None, None
    if vram_budget is not None:
        budget = parse_budget(vram_budget)
        plan = plan_vram(budget, cfg, size, frames, torch_dtype, None, memory=mem)
        placement = apply_plan(pipe, plan)
        result["plan"] = plan.to_dict()
        log(f"plan: {plan.summary()}")
        _cap(device, budget, notes, log)

    runner = Runner(device, ceilings, reps, telemetry, log)
    log(format_table([]))
    x = _dit_inputs(cfg.dit, size, frames, device, torch_dtype)
    h, w = size
    lat_t = (frames - 1) // 4 + 1
    with torch.no_grad():
        rows = {}
        rows["t5"] = runner.stage("T5 (2 prompts, once per request)", lambda: pipe.encode_prompts("a person dancing", ""),
                                  "bf16" if dname != "float32" else "fp32")
        clip_in = torch.randn(1, 3, cfg.clip.image_size, cfg.clip.image_size, device=device,
                              dtype=next(pipe.clip.parameters()).dtype)

        def clip_call():
            with pipe.placement.use(pipe.clip):
                return pipe.clip(clip_in)
        rows["clip"] = runner.stage("CLIP (1 image, once per request)", clip_call,
                                    "fp16" if dname != "float32" else "fp32")
        pixels = (torch.rand(1, 3, frames, h, w, device=device) * 2 - 1).to(torch_dtype)
        rows["vae_enc"] = runner.stage(f"VAE encode ({frames} frames)", lambda: pipe._encode(pixels), "tf32",
                                       reps=min(reps, 2))
        del pixels
        z = torch.randn(1, 16, lat_t, h // 8, w // 8, device=device)

        def decode():
            n = 0
            for chunk in pipe._decode(z):
                n += chunk.shape[2]
            return n
        rows["vae_dec"] = runner.stage(f"VAE decode ({frames} frames, streamed)", decode, "tf32", reps=min(reps, 2))
        del z
        variants = [("bf16" if dname != "float32" else "fp32", None)]
        if quant and quant_ok:
            variants.append((quant, quant))
        segments = {}
        for label, q in variants:
            if q is not None:
                placement = _quantize(pipe, q, placement, budget, cfg, size, frames, torch_dtype, mem, result,
                                      device, notes, log)
            gemm = "bf16" if dname != "float32" else "fp32"
            prep = runner.stage(f"DiT prepare ({label}, once per segment)",
                                lambda: pipe.dit.prepare(x["y"], x["pose"], x["face"], x["context"], x["clip"]), gemm,
                                reps=min(reps, 2))
            cond = pipe.dit.prepare(x["y"], x["pose"], x["face"], x["context"], x["clip"])
            step = runner.stage(f"DiT step ({label})", lambda: pipe.dit.denoise(x["latents"], x["t"], cond), gemm,
                                attention_flops=dit_attention_flops(cfg.dit, tokens))
            del cond
            segments[label] = _segment_row(runner, label, steps, frames, rows, prep, step)
        result["segments"] = {k: r.to_dict() for k, r in segments.items()}
        if e2e_steps:
            _measured_e2e(runner, pipe, cfg, size, frames, e2e_steps, rows, segments[variants[-1][0]], prep, step)

    if budget is not None and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    if "diffusers" in compare:
        if placement is not None:
            placement.remove()
        del pipe, x
        recover(device)
        _compare_diffusers(runner, cfg, size, frames, steps, torch_dtype, device, segments, rows, notes, log)

    result["rows"] = [r.to_dict() for r in runner.rows]
    best = segments[variants[-1][0]]
    video_s = (frames - 1) / VIDEO_FPS
    result["summary"] = {
        "segment_s": best.seconds, "segment_variant": variants[-1][0],
        "gpu_s_per_video_s": best.seconds / video_s if best.seconds else None,
        "request_once_s": sum(r.seconds or 0 for r in (rows["t5"], rows["clip"])),
    }
    if "diffusers_segment" in rows and rows["diffusers_segment"].seconds and best.seconds:
        result["summary"]["speedup_vs_diffusers"] = rows["diffusers_segment"].seconds / best.seconds
    log("")
    log(format_table(runner.rows))
    for k, v in result["summary"].items():
        log(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    for n in notes:
        log(f"note: {n}")
    _write(result, runner.rows, out, smoke, resolution, dname, quant, vram_budget, plot, log)
    return result


def _cap(device, budget: int, notes: list, log) -> None:
    if device.type != "cuda":
        note = "--vram-budget: planned and applied, but not enforced on the CPU"
        if note not in notes:
            notes.append(note)
        return
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, budget / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    log(f"capped this process at {fraction:.3f} of {total / 2**30:.1f} GiB = {budget / 1e9:.1f} GB")


def _quantize(pipe, scheme, placement, budget, cfg, size, frames, torch_dtype, mem, result, device, notes, log):
    """Swap the DiT's linears for `scheme` (engine-wide transforms are applied to a model that is
    not being streamed: remove the plan, quantize, re-plan with the quantized sizes)."""
    from wanimate.engine.offload import apply_plan, plan_vram
    from wanimate.quant import QuantConfig, quantize_

    if placement is not None:
        # Lift the cap first: removing the plan brings every block back to the device (quantizing
        # here stands in for loading a `wanimate quantize` checkpoint, which never holds bf16 weights).
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        placement.remove()
    pipe.dit.to(device)
    t = time.perf_counter()
    quantize_(pipe.dit, QuantConfig(scheme))
    log(f"quantized the DiT to {scheme} in {time.perf_counter() - t:.1f} s")
    recover(device)
    if budget is None:
        return None
    plan = plan_vram(budget, cfg, size, frames, torch_dtype, scheme, memory=mem)
    result[f"plan_{scheme}"] = plan.to_dict()
    log(f"plan ({scheme}): {plan.summary()}")
    placement = apply_plan(pipe, plan)
    _cap(device, budget, notes, log)
    return placement


def _segment_row(runner, label, steps, frames, rows, prep, step) -> Row:
    """One segment from its stages: 2 VAE encodes (pose video, conditioning video), prepare,
    `steps` DiT steps, the decode. T5 and CLIP run once per request and are not included."""
    parts = [(rows["vae_enc"], 2), (prep, 1), (step, steps), (rows["vae_dec"], 1)]
    ok = all(r.seconds is not None for r, _ in parts)
    seconds = sum(r.seconds * n for r, n in parts) if ok else None
    ideal = sum(r.ideal_s * n for r, n in parts) if ok and all(r.ideal_s for r, _ in parts) else None
    peaks = [r.peak_gib for r, _ in parts if r.peak_gib is not None]
    return runner.add(Row(f"segment, {steps} steps ({label}; estimated)", seconds, ideal, max(peaks) if peaks else None,
                          note=f"2 x encode + prepare + {steps} x step + decode; {frames - 1} new frames = "
                               f"{(frames - 1) / VIDEO_FPS:.2f} s of video; "
                               + (f"{seconds / ((frames - 1) / VIDEO_FPS):.1f} GPU-s per video-s" if seconds else "")))


def _measured_e2e(runner, pipe, cfg, size, frames, n_steps, rows, segment, prep, step) -> None:
    """A real one-segment generate() with n_steps, against the per-stage estimate for n_steps."""
    from wanimate.engine.pipeline import ArraySource, GenerateOptions

    rng = np.random.default_rng(0)
    h, w = size
    ref = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pose = ArraySource(rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8))
    s = cfg.dit.motion_size
    face = ArraySource(rng.integers(0, 256, (frames, s, s, 3), dtype=np.uint8))
    options = GenerateOptions(steps=n_steps, clip_len=frames, seed=0)
    # Per request: T5, CLIP and the reference encode; per segment (the first one encodes a cached
    # grey video instead of the carried frames): encodes, prepare, steps, decode.
    estimate = (rows["t5"].seconds or 0) + (rows["clip"].seconds or 0) + 3 * (rows["vae_enc"].seconds or 0) \
        + (prep.seconds or 0) + n_steps * (step.seconds or 0) + (rows["vae_dec"].seconds or 0)

    def run():
        pipe._grey_latents.clear()          # measure the first request of a fresh pipeline
        return pipe.generate(ref, pose, face, options, sink=lambda f: None)
    row = runner.stage(f"generate(), 1 segment, {n_steps} steps (measured)", run, "bf16", reps=1, warmup=False,
                       quiet=True)
    row.note = (f"per-stage estimate {estimate:.2f} s (T5 + CLIP + 3 encodes + prepare + {n_steps} steps + decode)"
                + (f"; measured/estimate {row.seconds / estimate:.2f}" if row.seconds and estimate else "")
                + (f"; {row.note}" if row.note else ""))
    row.estimate_s = estimate
    runner.log(format_row(row))


def _compare_diffusers(runner, cfg, size, frames, steps, torch_dtype, device, segments, rows, notes, log) -> None:
    try:
        from diffusers import AutoencoderKLWan, WanAnimateTransformer3DModel
    except ImportError as e:
        notes.append(f"--compare diffusers skipped: diffusers is not importable ({e})")
        log("note: " + notes[-1])
        return
    from wanimate.engine.loader import diffusers_config

    h, w = size
    lat_t = (frames - 1) // 4 + 1
    dcfg = {k: v for k, v in diffusers_config(cfg.dit).items() if not k.startswith("_")}
    failure = None
    try:
        keep = tuple(getattr(WanAnimateTransformer3DModel, "_keep_in_fp32_modules", None) or ())
        model = build_random(lambda: WanAnimateTransformer3DModel(**dcfg), device, torch_dtype, 1, keep_fp32=keep)
        fill_diffusers_buffers_(model)
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(1, 36, lat_t + 1, h // 8, w // 8, generator=g).to(device, torch_dtype)
        pose = torch.randn(1, 16, lat_t, h // 8, w // 8, generator=g).to(device, torch_dtype)
        face = (torch.rand(1, 3, frames, cfg.dit.motion_size, cfg.dit.motion_size, generator=g) * 2 - 1).to(device, torch_dtype)
        text = torch.randn(1, cfg.dit.text_len, cfg.dit.text_dim, generator=g).to(device, torch_dtype)
        image = torch.randn(1, cfg.dit.image_tokens, cfg.dit.image_dim, generator=g).to(device, torch_dtype)
        ts = torch.tensor([500.0], device=device)
        with torch.no_grad():
            tokens = (lat_t + 1) * (h // 16) * (w // 16)
            step = runner.stage("diffusers DiT step (motion+context every step)", lambda: model(
                hidden_states=hidden, timestep=ts, encoder_hidden_states=text, encoder_hidden_states_image=image,
                pose_hidden_states=pose, face_pixel_values=face, return_dict=False)[0], "bf16",
                attention_flops=dit_attention_flops(cfg.dit, tokens))
        del model, hidden, pose, face, text, image
        recover(device)
        vae_kwargs = {} if cfg.name == "14b" else {"base_dim": cfg.vae.dim}
        vae = build_random(lambda: AutoencoderKLWan(**vae_kwargs), device, torch.float32, 4, std=None)
        video = (torch.rand(1, 3, frames, h, w, device=device) * 2 - 1)
        z = torch.randn(1, 16, lat_t, h // 8, w // 8, device=device)
        with torch.no_grad():
            enc = runner.stage(f"diffusers VAE encode ({frames} frames)",
                               lambda: vae.encode(video).latent_dist.mode(), "tf32", reps=1)
            dec = runner.stage(f"diffusers VAE decode ({frames} frames)", lambda: vae.decode(z).sample, "tf32", reps=1)
        del vae, video, z
    except torch.cuda.OutOfMemoryError as e:
        failure = str(e).split("\n")[0]
    if failure is not None:
        recover(device)
        notes.append(f"diffusers comparison ran out of memory: {failure}")
        log("note: " + notes[-1])
        return
    recover(device)
    parts = [(enc, 2), (step, steps), (dec, 1)]
    seconds = sum(r.seconds * n for r, n in parts) if all(r.seconds for r, _ in parts) else None
    row = runner.add(Row(f"diffusers segment, {steps} steps (estimated)", seconds,
                         note="2 x encode + steps x forward + decode (diffusers recomputes motion and context per step)"))
    rows["diffusers_segment"] = row
    for label, seg in segments.items():
        if seg.seconds and seconds:
            runner.add(Row(f"speedup vs diffusers ({label})", None,
                           note=f"{seconds / seg.seconds:.2f}x (segment {seconds:.1f} s vs {seg.seconds:.1f} s; "
                                f"DiT step {step.seconds / max(1e-9, runner_step(runner, label)):.2f}x; "
                                f"VAE decode {dec.seconds / max(1e-9, rows['vae_dec'].seconds or 0):.2f}x)"))


def runner_step(runner, label) -> float:
    for r in runner.rows:
        if r.stage == f"DiT step ({label})" and r.seconds:
            return r.seconds
    return float("nan")


def _write(result, rows, out, smoke, resolution, dname, quant, budget, plot, log) -> None:
    directory = Path(out or os.environ.get("OUT") or "bench_out")
    directory.mkdir(parents=True, exist_ok=True)
    stem = "bench_" + "_".join(str(p) for p in ("smoke" if smoke else resolution, dname, quant,
                                                 f"budget{budget}" if budget else None) if p)
    path = directory / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    result["json"] = str(path)
    log(f"wrote {path}")
    if plot:
        png = plot_rows(rows, directory / f"{stem}.png", title=f"wanimate bench {stem[6:]}")
        if png:
            result["png"] = str(png)
            log(f"wrote {png}")
        else:
            log("note: matplotlib is not installed; no plot")


def plot_rows(rows: list[Row], path: Path, title: str = "") -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    timed = [r for r in rows if r.seconds]
    if not timed:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.45 * len(timed) + 1.5), sharey=True,
                                   gridspec_kw={"width_ratios": [3, 1]})
    y = np.arange(len(timed))
    ax1.barh(y, [r.seconds for r in timed], color="#4c72b0")
    ax1.set_xscale("log")
    ax1.set_yticks(y, [r.stage for r in timed], fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("seconds (log)")
    for i, r in enumerate(timed):
        pct = r.ceiling_pct
        ax1.text(r.seconds, i, f" {r.seconds:.3g} s" + (f"  {pct:.0f}% of ceiling" if pct else ""), va="center", fontsize=7)
    ax2.barh(y, [r.peak_gib or 0 for r in timed], color="#dd8452")
    ax2.set_xlabel("peak VRAM (GiB)")
    for i, r in enumerate(timed):
        if r.peak_gib:
            ax2.text(r.peak_gib, i, f" {r.peak_gib:.1f}", va="center", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="wanimate bench: stage timings on random 14B weights")
    ap.add_argument("--resolution", default="480p", help="480p | 720p | WxH")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--frames", type=int, default=77)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--quant", default=None, help="fp8 (needs wanimate.quant)")
    ap.add_argument("--vram-budget", default=None, help="e.g. 24GB: plan, apply and enforce")
    ap.add_argument("--compare", action="append", default=[], help="diffusers")
    ap.add_argument("--e2e-steps", type=int, default=1, help="also time a real 1-segment generate() (0: skip)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--attention", default=None, help="attention backend for the DiT (default sdpa)")
    ap.add_argument("--kernels", action="store_true", help="fused Triton kernels in the DiT")
    ap.add_argument("--vae-backend", default="torch", help="torch | compiled")
    ap.add_argument("--memory-model", default=None, help="MemoryModel JSON (from bench/vram_matrix.py) for the planner")
    ap.add_argument("--device", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny preset on the CPU")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    return run_bench(resolution=a.resolution, steps=a.steps, frames=a.frames, dtype=a.dtype, quant=a.quant,
                     vram_budget=a.vram_budget, compare=tuple(a.compare), smoke=a.smoke, device=a.device, reps=a.reps,
                     e2e_steps=a.e2e_steps, attention=a.attention, plot=not a.no_plot, out=a.out,
                     memory_model=a.memory_model, kernels=a.kernels, vae_backend=a.vae_backend)


if __name__ == "__main__":
    main()
