"""Compile every fused-kernel variant for Hopper (sm_90) without a GPU and report what the memory
path looks like: vector width of global loads/stores, layout conversions, registers and spills.

    python bench/kernels_codegen.py            # table
    python bench/kernels_codegen.py --check    # exit 1 if a Wan-size variant loads or stores rows
                                               # with narrower than 8-byte vectors or spills

The signatures and settings mirror what the launchers use for Wan shapes (chunk_settings at width
5120; pointers 16-byte aligned, width and row strides divisible by 16, as Triton specialises them). Needs triton >= 3.3 (compile API) and its bundled
ptxas for the register count; must run with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _setup():
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != here]   # see bench/kernels.py
    try:
        import wanimate  # noqa: F401
    except ImportError:
        import importlib.util
        spec = importlib.util.spec_from_file_location("wanimate", here.parent / "__init__.py",
                                                      submodule_search_locations=[str(here.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["wanimate"] = module
        spec.loader.exec_module(module)


def variants():
    """(name, jit function, {arg: type}, constexprs, num_warps, row_kernel). Types: '*bf16' etc., 'i32'."""
    from wanimate.kernels import gated_residual as GR, head_rms_norm as HR, layer_norm as LN, motion as MO
    from wanimate.kernels import rms_norm_rope as RR
    bf, f32 = "*bf16", "*fp32"

    def rope(dt):
        return dict(Q=dt, K=dt, WQ=dt, WK=dt, QO=dt, KO=dt, COS=f32, SIN=f32, L="i32", C="i32", stride_qb="i32",
                    stride_ql="i32", stride_kb="i32", stride_kl="i32", eps="fp32")

    def ln(x, out):
        return dict(X=x, Y=bf, G=f32, W=bf, BIAS=bf, SCALE=f32, SHIFT=f32, XO=f32, HO=out, L="i32", C="i32",
                    stride_xb="i32", stride_xl="i32", stride_yb="i32", stride_yl="i32", stride_gb="i32",
                    stride_sb="i32", stride_tb="i32", eps="fp32")
    flags = lambda **kw: {"HAS_RESIDUAL": False, "HAS_GATE": False, "AFFINE": False, "MODULATE": False, **kw}
    out = []
    chunk, nchunk, warps = RR.chunk_settings(5120)
    for dt in ("*bf16", "*fp32"):
        out.append((f"rms_norm_rope {dt[1:]}", RR._rms_norm_rope_kernel, rope(dt),
                    dict(HALF_D=64, HAS_K=True, HAS_ROPE=True, CHUNK=chunk, NCHUNK=nchunk), warps))
    lone_chunk, lone_nchunk, lone_warps = RR.chunk_settings(5120, wide_chunk=2048)   # as _launch for a lone q
    out.append(("rms_norm bf16", RR._rms_norm_rope_kernel, rope(bf),
                dict(HALF_D=1, HAS_K=False, HAS_ROPE=False, CHUNK=lone_chunk, NCHUNK=lone_nchunk), lone_warps))
    out.append(("rms_norm_rope bf16 (old, row)", RR._rms_norm_rope_row_kernel, rope(bf),
                dict(HALF_D=64, HAS_K=True, HAS_ROPE=True, BLOCK=8192), RR.row_settings(5120)[1]))
    # layer_norm.py: the chunk kernel (default) with the launcher's settings, and the old row kernel
    # with its own (4 warps without a residual, 8 with one).
    ln_chunk = dict(CHUNK=chunk, NCHUNK=nchunk)
    row_warps = RR.row_settings(5120)[1]
    ln_cases = [("layer_norm+mod fp32->bf16", ln(f32, bf), flags(MODULATE=True)),
                ("layer_norm+mod bf16->bf16", ln(bf, bf), flags(MODULATE=True)),
                ("layer_norm affine fp32->bf16", ln(f32, bf), flags(AFFINE=True)),
                ("add+gate+layer_norm affine", ln(f32, bf), flags(HAS_RESIDUAL=True, HAS_GATE=True, AFFINE=True)),
                ("add+layer_norm+mod", ln(f32, bf), flags(HAS_RESIDUAL=True, MODULATE=True))]
    for name, types, fl in ln_cases:
        out.append((name, LN._layer_norm_kernel, types, {**fl, **ln_chunk}, warps))
    for name, types, fl in ln_cases[::3]:
        out.append((f"{name} (old, row)", LN._layer_norm_row_kernel, types, {**fl, "BLOCK": 8192},
                    row_warps if fl["HAS_RESIDUAL"] else min(row_warps, 4)))
    out.append(("gated_residual", GR._gated_residual_kernel,
                dict(X=f32, Y=bf, G=f32, OUT=f32, L="i32", C="i32", stride_xb="i32", stride_xl="i32",
                     stride_yb="i32", stride_yl="i32", stride_gb="i32"), dict(HAS_GATE=True, BLOCK=1024), 4))
    out.append(("head_rms_norm bf16", HR._head_rms_norm_kernel,
                dict(X=bf, W=bf, OUT=bf, M="i32", H="i32", D="i32", stride_o="i32", stride_h="i32", eps="fp32"),
                dict(ROWS=32, BLOCK_D=128), 4))
    out.append(("motion bias_act + residual bf16", MO._bias_act_kernel,
                dict(X=bf, BIAS=bf, R=bf, OUT=bf, NC="i32", C="i32", HW="i32"),
                dict(HAS_RESIDUAL=True, BLOCK=4096, PLANES=1), 8))
    blur_types = dict(X=bf, OUT=bf, H="i32", W="i32", HO="i32", WO="i32")
    out.append(("motion blur bf16 rows (shifted taps)", MO._blur_rows_kernel,
                dict(X=bf, OUT=bf, NC="i32", H="i32", W="i32", HO="i32", WO="i32"),
                dict(PAD=2, ROWS=32, BW=256, PLANES=1), 4))
    out.append(("motion blur bf16 2-D (shifted taps)", MO._blur_kernel, blur_types, dict(PAD=2, BH=16, BW=64), 4))
    return out


def compile_one(fn, types: dict, consts: dict, warps: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {**types, **{k: "constexpr" for k in consts}}
    names = list(sig)
    # What launch-time specialisation gives for Wan shapes: aligned pointers, widths/strides % 16 == 0.
    aligned = {i for i, n in enumerate(names) if sig[n].startswith("*") or n.startswith("stride") or n in ("C", "D", "HW", "H", "W")}
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    info = {"loads": sorted(set(re.findall(r"ld\.global[.a-zA-Z0-9:_]*", ptx))),
            "stores": sorted(set(re.findall(r"st\.global[.a-zA-Z0-9:_]*", ptx))),
            "layout_converts": ttgir.count("convert_layout"), "smem": kernel.metadata.shared,
            "regs": None, "spill_bytes": None}
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for ptxas in (bindir / "ptxas-blackwell", bindir / "ptxas"):    # the newer one reads newer PTX
        if not ptxas.exists():
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        log = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
        os.unlink(f.name)
        if "Used" in log:
            info["regs"] = int(re.search(r"Used (\d+) registers", log).group(1))
            info["spill_bytes"] = int(re.search(r"(\d+) bytes spill stores", log).group(1))
            break
    return info


def problems(name: str, info: dict) -> list[str]:
    """Row data must move in vectors of at least 8 bytes (head_rms_norm's 256-byte weight may not)
    and nothing spills. 8, not 16: the wide-row settings that run on the GPU (chunk_settings: 1024
    columns over 8 warps) give each thread 4 elements per chunk, 8 bytes of bf16, and measured
    faster than the 16-byte 4-warp setting. The blur is exempt from the vector rule: its taps are
    reads shifted by -2..+1 elements and its output rows are odd-sized (513 columns), so no wider
    access is aligned."""
    bad = []
    vector = lambda op: ".v4.b32" in op or ".v2.b32" in op or ".v2.b64" in op or ".v4.b16" in op
    vectors = any(map(vector, info["loads"])) and bool(info["stores"]) and all(map(vector, info["stores"]))
    if "shifted taps" not in name and not vectors:
        bad.append(f"{name}: global memory ops {info['loads']} / {info['stores']} are not all 8-byte vectors or wider")
    if info["spill_bytes"]:
        bad.append(f"{name}: {info['spill_bytes']} bytes of register spills")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    _setup()
    import triton
    print(f"triton {triton.__version__}, target sm_90")
    failures = []
    for name, fn, types, consts, warps in variants():
        info = compile_one(fn, types, consts, warps)
        failures += problems(name, info)
        print(f"{name:38s} warps={warps:2d} regs={info['regs']} spill={info['spill_bytes']} "
              f"converts={info['layout_converts']} smem={info['smem']} loads={info['loads']} stores={info['stores']}")
    for f in failures:
        print("PROBLEM", f)
    return 1 if (args.check and failures) else 0


if __name__ == "__main__":
    sys.exit(main())
