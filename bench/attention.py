"""Attention benchmark for one GPU run: kernel throughput and error, a config sweep for our Triton
kernels, and the 14B DiT forward at 480p / 720p with each backend.

    python -m wanimate.bench.attention --out $OUT            # everything (~7 min on an H100/H200)
    python -m wanimate.bench.attention --sections sweep,kernels --out $OUT     # ~3 min
    python -m wanimate.bench.attention --sections dit --sage 128x128x8x3 --triton 128x64x8x3 --diffusers
    python -m wanimate.bench.attention --smoke               # CPU, TRITON_INTERPRET=1, toy sizes

Sections, in order (the JSON is rewritten after every row, so a timeout keeps what finished):
  compile  (only on request; no GPU needed) every sweep candidate compiled for sm_90 by Triton's
           bundled ptxas: registers, spills, shared memory, instructions per key tile
  sweep    each candidate config of the 'sage' and 'triton' kernels (--sweep-kernels) at each of
           --sweep-tokens (default 75,600), with SDPA on the same inputs: time + error; the
           fastest correct one at the first token count is `chosen_config` and is used below
  kernels  B=1, H=40, D=128 bf16 at 32,760 / 34,320 / 75,600 tokens: sdpa, flash / xformers (if
           installed), triton, sage (plus sage's quantization and attention kernel alone).
           TFLOP/s-equivalent = 4·L²·H·D / time. Error of each vs fp32 SDPA on the first 4 heads,
           on DiT-like q/k (4 channels per head 10-50x larger, kernels.attention.wan_like_qkv)
  dit      the engine's 14B DiT, random bf16 weights built on the GPU, face pixels 1x3x77x512x512,
           480p (32,760 tokens) and 720p (75,600): full forward (prepare + denoise, what the
           diffusers baseline times) and denoise alone, per backend on self-attention; rel L2 of
           the prediction vs the sdpa run. --diffusers adds diffusers' eager model in the same run.

Timing: CUDA events after warm-up, median of --reps. Every row catches OOM and errors, records
them, frees memory and goes on. Memory: kernels ~6 GB, dit ~34 GB weights + ~12 GB (720p).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

TOKENS = (32760, 34320, 75600)
HEADS, HEAD_DIM = 40, 128
RESOLUTIONS = {"480p": (832, 480), "720p": (1280, 720)}
FRAMES = 77                                   # as the diffusers baseline: 20 latent frames + 1 reference


def sweep_candidates(kernel: str, A) -> list:
    """Hopper-minded candidates. BLOCK_M 128 over 8 warps: one 64-row wgmma tile per warpgroup, 1
    CTA per SM. BLOCK_M 64 over 4 warps with TMA: ~185 registers, so 2 independent CTAs per SM
    whose softmax and MMAs fall out of phase (what FA3's ping-pong schedules by hand). TMA (sage
    only) frees ~70 registers at 128x128 (255 -> ~180, offline sm_90 compile). The sage variants
    (same math): xws is Triton's warp specialization, xpoly moves half the exponentials to the FMA
    pipe, xacc1 accumulates P·V in one level (the wgmma stays in flight across the loop edge: one
    wgmma wait per key tile, no ptxas serialization, ~35 fewer registers), xqk8 is e4m3 Q·K
    (less accurate: ~2.5x the Q·K rounding error of int8), xfa3 issues S_{j+1} before tile j's
    softmax (ptxas still serializes it, C7514: measured for the record). xpipe (ptxas C7515,
    spills) and xr168 (spills) left the list after their offline compile."""
    C, P = A.AttnConfig, A.parse_config
    if kernel == "sage":     # int8/fp8 tiles: a 128x128 K + V stage is 32 KB
        base = [C(128, 128, 8, 3), C(128, 128, 8, 3, True), C(64, 128, 4, 2, True), C(64, 128, 4, 3, True),
                C(64, 64, 4, 3, True)]
        variants = ["64x128x4x4xtma", "64x128x4x3xtmaxpoly", "128x128x8x3xtmaxpoly",
                    "64x128x4x3xtmaxws", "128x128x8x3xtmaxws",
                    "64x128x4x3xtmaxacc1", "128x128x8x3xtmaxacc1", "64x128x4x3xtmaxpolyxacc1",
                    "64x128x4x3xtmaxqk8", "128x128x8x3xtmaxqk8", "64x128x4x3xtmaxqk8xacc1", "128x128x8x3xtmaxqk8xacc1",
                    "64x128x4x3xtmaxqk8xfa3", "64x128x4x3xtmaxqk8xfa3xacc1", "128x128x8x3xtmaxqk8xfa3xacc1",
                    "64x64x4x3xtmaxqk8xfa3xacc1"]
        return base + [P(v) for v in variants]
    return [C(128, 64, 8, 2), C(128, 64, 8, 3), C(128, 64, 8, 4), C(128, 128, 8, 2), C(64, 64, 4, 3),
            C(64, 128, 4, 2)]


def compile_report(kernel: str, cfg, capability: int = 90, head_dim: int = HEAD_DIM) -> dict:
    """Compile one kernel for sm_<capability> without a GPU (Triton's bundled ptxas) and read its
    resources and its inner key loop from the SASS: registers, stack (spills), shared memory,
    instructions per key tile. The input specialization matches a real call (16-byte aligned
    pointers, strides divisible by 16), else Triton would emit scalar loads."""
    import re
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from wanimate.kernels import attention as A
    d = head_dim
    if kernel == "sage":
        fn = A._sage_fwd
        sig = {"Q8": "*i8", "QS": "*fp32", "K8": "*i8", "KS": "*fp32", "VT8": "*fp8e4nv", "VS": "*fp32",
               "VM": "*fp32", "O": "*bf16", "sob": "i32", "sol": "i32", "soh": "i32", "H": "i32", "Lq": "i32",
               "Lk": "i32", "LQP": "i32", "LKP": "i32"}
        qk = "fp8e4nv" if cfg.qk8 else "i8"
        sig.update(Q8=f"*{qk}", K8=f"*{qk}")
        if cfg.tma:
            sig.update(Q8=f"tensordesc<{qk}[{cfg.block_m}, {d}]>", K8=f"tensordesc<{qk}[{cfg.block_n}, {d}]>",
                       VT8=f"tensordesc<fp8e4nv[{d}, {cfg.block_n}]>")
        consts = {"D": d, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "TMA": cfg.tma, "PIPE": cfg.pipe,
                  "WS": cfg.ws, "POLY": cfg.poly, "INTERP": False, "QK8": cfg.qk8, "FA3": cfg.fa3,
                  "ACC1": cfg.acc1}
    else:
        fn = A._attn_fwd
        sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16"}
        sig.update({n: "i32" for n in ("sqb", "sql", "sqh", "skb", "skl", "skh", "svb", "svl", "svh",
                                       "sob", "sol", "soh", "H", "Lq", "Lk")})
        sig["qk_scale"] = "fp32"
        consts = {"D": d, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "INTERP": False}
    sig.update({k: "constexpr" for k in consts})
    unaligned = {"H", "Lq", "Lk", "qk_scale"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
             if t != "constexpr" and not t.startswith("tensordesc") and n not in unaligned}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", capability, 32),
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                    **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {})))
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    rec = {"shared_kib": round(k.metadata.shared / 1024, 1)}
    if not tool.exists():
        return rec | {"note": "no cuobjdump in this triton wheel"}
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        res = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        sass = subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", res, re.S)
    rec.update(registers=int(m.group(1)), stack_bytes=int(m.group(2)))
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for addr, txt in ins:                       # backward branches = loops; the first is the main one
        b = re.search(r"BRA\s+0x([0-9a-f]+)", txt)
        if b and int(b.group(1), 16) < addr:
            loops.append([t for a, t in ins if int(b.group(1), 16) <= a <= addr])
    if loops:
        body = loops[0]
        op = lambda t: (t.split()[1] if t.startswith("@") else t.split()[0])
        rec.update(loop_instructions=len(body), loop_mufu=sum(op(t).startswith("MUFU") for t in body),
                   loop_mma=sum("GMMA" in op(t) for t in body),
                   loop_bar=sum(op(t).startswith("BAR") for t in body),
                   # wgmma waits per key tile: 2 = both MMAs synchronous; 1 = one left in flight (acc1);
                   # more = ptxas serialized the wgmmas (C7514/C7515: each k-step waited)
                   loop_wgmma_wait=sum(op(t).startswith("WARPGROUP.DEPBAR") for t in body))
    return rec


class Bench:
    def __init__(self, args):
        import torch
        self.torch, self.args = torch, args
        self.cuda = torch.cuda.is_available() and not args.smoke
        self.dev = torch.device("cuda" if self.cuda else "cpu")
        self.out = self._out_path(args)
        self.result = {"env": self._env(), "args": vars(args), "chosen_config": {}, "rows": []}

    # -- plumbing ---------------------------------------------------------------------------

    @staticmethod
    def _out_path(args) -> Path:
        if args.out:
            p = Path(args.out)
            return p / "attention_bench.json" if p.is_dir() or not p.suffix else p
        return Path(os.environ.get("OUT", ".")) / "attention_bench.json"

    def _env(self) -> dict:
        torch = self.torch
        env = {"python": platform.python_version(), "torch": torch.__version__, "device": "cpu"}
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
        if self.cuda:
            p = torch.cuda.get_device_properties(0)
            env.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                       memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
        for mod in ("flash_attn_interface", "flash_attn", "xformers"):
            try:
                m = __import__(mod)
                env[mod] = getattr(m, "__version__", "present")
            except Exception:
                env[mod] = None
        env["interpreter"] = os.environ.get("TRITON_INTERPRET") == "1"
        return env

    def save(self):
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1))
        tmp.replace(self.out)

    def free(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def time(self, fn, reps: int, warmup: int = 1) -> tuple[float, float]:
        """(median, min) seconds of fn() after warm-up (bench/timing.py time_calls: back to back)."""
        from wanimate.bench.timing import time_calls
        for _ in range(warmup):
            fn()
        self.sync()
        times = time_calls(fn, "cuda" if self.cuda else "cpu", reps)
        return statistics.median(times), min(times)

    def row(self, section: str, fn, **keys) -> dict:
        """Run one measurement; OOM and errors become a recorded row, never a crash."""
        torch = self.torch
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        try:
            rec = fn()
            status = "ok"
        except torch.cuda.OutOfMemoryError as e:
            rec, status = {"error": f"OOM: {str(e).splitlines()[0]}"}, "oom"
        except Exception as e:            # a compile failure of one config must not end the run
            rec, status = {"error": f"{type(e).__name__}: {str(e)[:400]}",
                           "trace": traceback.format_exc()[-1500:]}, "error"
        r = {"section": section, **keys, "status": status, **rec, "wall_s": round(time.time() - t0, 1)}
        if self.cuda:
            r["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        self.result["rows"].append(r)
        self.save()
        self.free()
        shown = {k: v for k, v in r.items() if k not in ("trace", "section")}
        print(f"[{section}] " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
        return r

    # -- offline compile (no GPU needed) ----------------------------------------------------

    def compile(self):
        from wanimate.kernels import attention as A
        for kernel in ("sage", "triton"):
            for cfg in sweep_candidates(kernel, A):
                self.row("compile", lambda c=cfg: compile_report(kernel, c, head_dim=HEAD_DIM),
                         kernel=kernel, config=cfg.spec, target="sm_90")

    # -- kernels ----------------------------------------------------------------------------

    def qkv(self, tokens: int):
        from wanimate.kernels import attention as A
        torch = self.torch
        h, d = self.heads, self.head_dim
        q, k, v = A.wan_like_qkv(1, tokens, h, d, seed=tokens, dtype=torch.bfloat16, device=self.dev)
        nh = min(4, h)
        # fp32 SDPA on the first heads, 4k queries at a time: if torch picks its math kernel for
        # fp32, the score matrix of one chunk stays a few GB.
        qs, ks, vs = q[:, :, :nh], k[:, :, :nh], v[:, :, :nh]
        ref = torch.cat([A.attention_ref(qs[:, i:i + 4096], ks, vs) for i in range(0, tokens, 4096)], dim=1)
        return q, k, v, ref, nh

    @staticmethod
    def error(out, ref, nh) -> dict:
        o, r = out[:, :, :nh].double().flatten(), ref.double().flatten()
        return {"cos": round(float(o @ r / (o.norm() * r.norm())), 6),
                "rel_l2": round(float((o - r).norm() / r.norm()), 5),
                "max_abs": round(float((o - r).abs().max()), 5)}

    def sweep(self, tokens_list):
        """Every candidate at each token count (the first is the one `chosen_config` is picked at),
        with SDPA timed on the same inputs for the ratio."""
        from wanimate.kernels import attention as A
        torch = self.torch
        tol = {"sage": 0.05, "triton": 0.01}
        cands = {k: sweep_candidates(k, A) for k in self.args.sweep_kernels}
        if self.args.smoke:
            smoke = {"sage": [A.INTERPRETER_CONFIG, A.AttnConfig(16, 32, 4, 1, True), A.parse_config("32x32x4x1xpipexpoly"),
                              A.parse_config("32x32x4x1xtmaxqk8xfa3xacc1"), A.parse_config("16x32x4x1xacc1")],
                     "triton": [A.INTERPRETER_CONFIG, A.AttnConfig(16, 32, 4, 1)]}
            cands = {k: smoke[k] for k in cands}
        for i, tokens in enumerate(tokens_list):
            q, k, v, ref, nh = self.qkv(tokens)
            flops = 4 * tokens * tokens * self.heads * self.head_dim
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

            def measure(fn):
                t, tmin = self.time(fn, self.args.sweep_reps)
                return {"ms": round(t * 1e3, 3), "min_ms": round(tmin * 1e3, 3),
                        "tflops": round(flops / t / 1e12, 1), **self.error(fn(), ref, nh)}
            r = self.row("sweep", lambda: measure(sdpa), kernel="sdpa", tokens=tokens, config="-")
            sdpa_ms = r.get("ms") if r["status"] == "ok" else None
            for kernel, configs in cands.items():
                best = None
                for cfg in configs:
                    fn = (lambda c=cfg: A.sage_attention(q, k, v, config=c)) if kernel == "sage" else \
                         (lambda c=cfg: A.triton_attention(q, k, v, config=c))
                    r = self.row("sweep", lambda fn=fn: measure(fn), kernel=kernel, tokens=tokens, config=cfg.spec)
                    if r["status"] == "ok" and sdpa_ms:
                        r["vs_sdpa"] = round(sdpa_ms / r["ms"], 3)
                        self.save()
                    if r["status"] == "ok" and r["rel_l2"] <= tol[kernel] and (best is None or r["ms"] < best[1]):
                        best = (cfg.spec, r["ms"])
                if best and i == 0:
                    self.result["chosen_config"][kernel] = best[0]
                if best:
                    print(f"fastest {kernel} config at {tokens} tokens: {best[0]} ({best[1]} ms)", flush=True)
            del q, k, v, ref
            self.free()

    def kernels(self, tokens_list):
        from wanimate.engine import attention as E
        from wanimate.kernels import attention as A
        backends = ["sdpa"]
        if self.result["env"].get("flash_attn_interface") or self.result["env"].get("flash_attn"):
            backends.append("flash")
        if self.result["env"].get("xformers"):
            backends.append("xformers")
        chosen = self.result["chosen_config"]
        backends += [f"triton:{chosen['triton']}" if "triton" in chosen else "triton",
                     f"sage:{chosen['sage']}" if "sage" in chosen else "sage"]
        for tokens in tokens_list:
            q, k, v, ref, nh = self.qkv(tokens)
            flops = 4 * tokens * tokens * self.heads * self.head_dim
            sdpa_ms = None
            for name in backends:
                def measure(name=name):
                    fn = E.get_backend(name)
                    t, tmin = self.time(lambda: fn(q, k, v), self.args.reps)
                    return {"ms": round(t * 1e3, 3), "min_ms": round(tmin * 1e3, 3),
                            "tflops": round(flops / t / 1e12, 1), **self.error(fn(q, k, v), ref, nh)}
                r = self.row("kernels", measure, tokens=tokens, backend=name)
                if name == "sdpa" and r["status"] == "ok":
                    sdpa_ms = r["ms"]
                if r["status"] == "ok" and sdpa_ms:
                    r["vs_sdpa"] = round(sdpa_ms / r["ms"], 3)
                    self.save()
            # sage split: quantization vs the attention kernel on quantized operands.
            spec = chosen.get("sage")
            cfg = A.parse_config(spec) if spec else A.default_config("sage", q.device)

            def split(cfg=cfg):
                quant = lambda: A.quantize_qkv(q, k, v, block_m=cfg.block_m, block_n=cfg.block_n)
                tq, _ = self.time(quant, self.args.reps)
                qq = quant()
                ta, _ = self.time(lambda: A.sage_attention_quantized(qq, q.shape, tokens, q.dtype, cfg), self.args.reps)
                return {"quant_ms": round(tq * 1e3, 3), "attn_ms": round(ta * 1e3, 3),
                        "attn_tflops": round(flops / ta / 1e12, 1)}
            self.row("sage_split", split, tokens=tokens, config=cfg.spec)
            del q, k, v, ref
            self.free()

    # -- the DiT ----------------------------------------------------------------------------

    def build_dit(self, preset_name: str):
        torch = self.torch
        from wanimate.engine.config import preset
        from wanimate.bench.bench import build_random
        from wanimate.engine.loader import build_dit
        cfg = preset(preset_name).dit
        # bf16 on the meta device first: 17B parameters never exist in fp32 on the GPU.
        return build_random(lambda: build_dit(cfg), self.dev, torch.bfloat16, seed=0), cfg

    def dit_inputs(self, cfg, width: int, height: int, frames: int):
        torch = self.torch
        g = torch.Generator(device=self.dev).manual_seed(1)
        lt, lh, lw = (frames - 1) // 4 + 1, height // 8, width // 8
        r = lambda *s: torch.randn(*s, generator=g, device=self.dev)
        face = torch.rand(1, 3, frames, cfg.motion_size, cfg.motion_size, generator=g, device=self.dev) * 2 - 1
        return dict(latents=r(1, 16, lt + 1, lh, lw), t=torch.tensor([500], device=self.dev),
                    y=r(1, 20, lt + 1, lh, lw), pose=r(1, 16, lt, lh, lw), face=face.to(torch.bfloat16),
                    context=r(1, cfg.text_len, cfg.text_dim).to(torch.bfloat16),
                    clip=r(1, 257, cfg.image_dim).to(torch.bfloat16),
                    tokens=(lt + 1) * (lh // 2) * (lw // 2))

    def dit(self):
        torch = self.torch
        from wanimate.engine import attention as E
        chosen = self.result["chosen_config"]
        backends = ["sdpa"]
        if self.result["env"].get("flash_attn_interface") or self.result["env"].get("flash_attn"):
            backends.append("flash")
        backends += [f"triton:{self.args.triton or chosen.get('triton', '')}".rstrip(":"),
                     f"sage:{self.args.sage or chosen.get('sage', '')}".rstrip(":")]
        t0 = time.time()
        model, cfg = self.build_dit(self.args.preset)
        print(f"built {self.args.preset} DiT in {time.time() - t0:.1f}s", flush=True)
        for res in self.args.resolutions:
            w, h = RESOLUTIONS[res] if not self.args.smoke else (64, 64)
            x = self.dit_inputs(cfg, w, h, FRAMES if not self.args.smoke else 9)
            args = (x["latents"], x["t"], x["y"], x["pose"], x["face"], x["context"], x["clip"])
            ref = None
            for name in backends:
                def measure(name=name):
                    nonlocal ref
                    E.set_attention_backend(model, name)
                    with torch.no_grad():
                        t = time.time()
                        out = model(*args)
                        self.sync()
                        first = time.time() - t
                        fwd, _ = self.time(lambda: model(*args), 1, warmup=0)
                        cond = model.prepare(x["y"], x["pose"], x["face"], x["context"], x["clip"])
                        den, den_min = self.time(lambda: model.denoise(x["latents"], x["t"], cond),
                                                 self.args.dit_reps, warmup=0)
                    rec = {"tokens": x["tokens"], "first_s": round(first, 2), "forward_s": round(fwd, 3),
                           "denoise_s": round(den, 3), "denoise_min_s": round(den_min, 3),
                           "finite": bool(torch.isfinite(out).all()), "attention": E.attention_report(model)}
                    if ref is None:
                        ref = out
                    else:
                        rec["rel_l2_vs_sdpa"] = round(float((out - ref).norm() / ref.norm()), 5)
                    return rec
                self.row("dit", measure, resolution=res, backend=name)
            E.set_attention_backend(model, "sdpa")
            del x, args, ref
            self.free()
        del model
        self.free()

    def diffusers(self):
        """diffusers' WanAnimateTransformer3DModel eager, as shared/baselines/bench_diffusers.py."""
        torch = self.torch
        try:
            from diffusers import WanAnimateTransformer3DModel
        except ImportError as e:
            def missing(e=e):
                raise e
            self.row("dit", missing, resolution="-", backend="diffusers-eager")
            return
        with torch.device("meta"):
            m = WanAnimateTransformer3DModel()
        from wanimate.bench.bench import fill_diffusers_buffers_, init_random_
        m = init_random_(m.to(torch.bfloat16).to_empty(device=self.dev), seed=0)
        fill_diffusers_buffers_(m)
        m = m.eval().requires_grad_(False)
        for res in self.args.resolutions:
            w, h = RESOLUTIONS[res]
            lt, lh, lw = (FRAMES - 1) // 4 + 1, h // 8, w // 8
            gg = torch.Generator(device=self.dev).manual_seed(0)
            bf = dict(device=self.dev, dtype=torch.bfloat16, generator=gg)
            kw = dict(hidden_states=torch.randn(1, 36, lt + 1, lh, lw, **bf), timestep=torch.tensor([500.0], device=self.dev),
                      encoder_hidden_states=torch.randn(1, 512, 4096, **bf),
                      encoder_hidden_states_image=torch.randn(1, 257, 1280, **bf),
                      pose_hidden_states=torch.randn(1, 16, lt, lh, lw, **bf),
                      face_pixel_values=torch.randn(1, 3, FRAMES, 512, 512, **bf), return_dict=False)

            def measure():
                with torch.no_grad():
                    t = time.time()
                    m(**kw)
                    self.sync()
                    first = time.time() - t
                    fwd, fmin = self.time(lambda: m(**kw), self.args.dit_reps, warmup=0)
                return {"tokens": (lt + 1) * (lh // 2) * (lw // 2), "first_s": round(first, 2),
                        "forward_s": round(fwd, 3), "forward_min_s": round(fmin, 3)}
            self.row("dit", measure, resolution=res, backend="diffusers-eager")
            del kw
            self.free()
        del m
        self.free()

    # -- report -----------------------------------------------------------------------------

    def summary(self):
        rows = self.result["rows"]
        comp = [r for r in rows if r["section"] == "compile"]
        if comp:
            print("\n== offline sm_90 compile: registers / spill stack / shared KiB / instructions per key tile")
            for r in comp:
                print(f"{r['kernel']:<7} {r['config']:<28} " + (
                    f"regs {r.get('registers')} stack {r.get('stack_bytes')} smem {r.get('shared_kib')} "
                    f"loop {r.get('loop_instructions')} (MUFU {r.get('loop_mufu')}, MMA {r.get('loop_mma')}, "
                    f"BAR {r.get('loop_bar')}, wgmma waits {r.get('loop_wgmma_wait')})" if r["status"] == "ok"
                    else r.get("error", "")))
        sw = [r for r in rows if r["section"] == "sweep"]
        if sw:
            print("\n== sweep (quantization + attention; TFLOP/s-equivalent = 4 L^2 H D / t; error vs fp32 SDPA)")
            print(f"{'tokens':>7} {'kernel':<7} {'config':<28} {'ms':>9} {'TFLOP/s':>8} {'x sdpa':>7} {'cos':>9} {'rel_l2':>8}")
            for r in sw:
                print(f"{r['tokens']:>7} {r['kernel']:<7} {r['config']:<28} {r.get('ms', '-'):>9} {r.get('tflops', '-'):>8} "
                      f"{r.get('vs_sdpa', '-'):>7} {r.get('cos', '-'):>9} {r.get('rel_l2', r.get('error', '-'))!s:>8}")
        print("\n== attention kernels (TFLOP/s-equivalent = 4 L^2 H D / t; error vs fp32 SDPA, first 4 heads)")
        print(f"{'tokens':>7} {'backend':<22} {'ms':>9} {'TFLOP/s':>8} {'x sdpa':>7} {'cos':>9} {'rel_l2':>8}")
        for r in rows:
            if r["section"] == "kernels":
                print(f"{r['tokens']:>7} {r['backend']:<22} {r.get('ms', '-'):>9} {r.get('tflops', '-'):>8} "
                      f"{r.get('vs_sdpa', '-'):>7} {r.get('cos', '-'):>9} {r.get('rel_l2', r.get('error', '-')):>8}")
        for r in rows:
            if r["section"] == "sage_split":
                print(f"  sage split @{r['tokens']}: quant {r.get('quant_ms')} ms, attention {r.get('attn_ms')} ms "
                      f"({r.get('attn_tflops')} TFLOP/s)")
        print("\n== DiT forward (s); denoise = one step with prepare() cached")
        print(f"{'res':>5} {'backend':<22} {'forward':>8} {'denoise':>8} {'x sdpa':>7} {'rel_l2 vs sdpa':>15} {'peak GiB':>9}")
        base = {}
        for r in rows:
            if r["section"] == "dit" and r["status"] == "ok":
                if r["backend"] == "sdpa":
                    base[r["resolution"]] = r["forward_s"]
                sp = base.get(r["resolution"])
                ratio = round(sp / r["forward_s"], 3) if sp and r.get("forward_s") else "-"
                print(f"{r['resolution']:>5} {r['backend']:<22} {r.get('forward_s', '-'):>8} {r.get('denoise_s', '-'):>8} "
                      f"{ratio:>7} {r.get('rel_l2_vs_sdpa', '-'):>15} {r.get('peak_gib', '-'):>9}")
            elif r["section"] == "dit":
                print(f"{r['resolution']:>5} {r['backend']:<22} {r['status']}: {r.get('error')}")
        print(f"\nchosen configs: {self.result['chosen_config']}  (kernels/attention.py DEFAULT_CONFIGS)")
        print(f"JSON: {self.out}")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="JSON path or directory (default $OUT/attention_bench.json)")
    ap.add_argument("--sections", default="sweep,kernels,dit",
                    help="comma list of sweep,kernels,dit; 'compile' (offline sm_90 compile, no GPU) on request")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--sweep-tokens", default="75600", help="comma list; configs are chosen at the first")
    ap.add_argument("--sweep-kernels", default="sage,triton", help="comma list of sage,triton")
    ap.add_argument("--resolutions", default="480p,720p")
    ap.add_argument("--reps", type=int, default=5, help="timed repeats per kernel row")
    ap.add_argument("--sweep-reps", type=int, default=3)
    ap.add_argument("--dit-reps", type=int, default=2, help="timed denoise repeats per DiT row")
    ap.add_argument("--sage", help="pin the sage config for the dit section (e.g. 128x128x8x3)")
    ap.add_argument("--triton", help="pin the triton config for the dit section")
    ap.add_argument("--diffusers", action="store_true", help="also time diffusers' eager DiT in this run")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, toy sizes")
    args = ap.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    args.tokens = [int(t) for t in args.tokens.split(",") if t]
    args.sweep_tokens = [int(t) for t in args.sweep_tokens.split(",") if t]
    args.sweep_kernels = [k for k in args.sweep_kernels.split(",") if k]
    args.resolutions = [r for r in args.resolutions.split(",") if r]
    bad = (set(args.sections) - {"compile", "sweep", "kernels", "dit"} or set(args.resolutions) - set(RESOLUTIONS)
           or set(args.sweep_kernels) - {"sage", "triton"})
    if bad:
        ap.error(f"unknown sections/resolutions: {sorted(bad)}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.smoke:
        # Must precede the first import of wanimate.kernels.attention (kernels decorate at import).
        os.environ["TRITON_INTERPRET"] = "1"
    b = Bench(args)
    if args.smoke:
        b.heads, b.head_dim, args.preset = 2, 64, "tiny"
        args.tokens, args.sweep_tokens, args.resolutions = [96, 150], [150, 96], args.resolutions[:1]
        args.reps = args.sweep_reps = args.dit_reps = 1
    else:
        b.heads, b.head_dim, args.preset = HEADS, HEAD_DIM, "14b"
        if not b.cuda and set(args.sections) - {"compile"}:
            print("no CUDA device: run with --smoke, or --sections compile, on a CPU", file=sys.stderr)
            return 2
    print(json.dumps(b.result["env"]), flush=True)
    t0 = time.time()
    if "compile" in args.sections:
        b.compile()
    if "sweep" in args.sections:
        b.sweep(args.sweep_tokens)
    if "kernels" in args.sections:
        b.kernels(args.tokens)
    if "dit" in args.sections:
        b.dit()
        if args.diffusers and not args.smoke:
            b.diffusers()
    b.result["total_s"] = round(time.time() - t0, 1)
    b.save()
    b.summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
