"""Where the activation quantizer's kernel and its torch reference disagree on a GPU.

    python bench/quant_act_check.py [--rows 32760] [--k 5120]

Runs kernels/quant_act.py (both variants) and quant/act.py's per_token_quant_ref on the same bf16
input on CUDA and prints, for the first mismatching elements: the scaled value y = x * (448 / amax)
in fp32 (hex), the kernel's and the reference's e4m3 codes, and which one is the round-to-nearest-
even of y (computed here in float64 from the e4m3 grid). Also checks torch's own fp32 -> e4m3 cast
against that float64 rounding on the mismatching y values.
"""
from __future__ import annotations

import argparse
import struct

import torch


def e4m3_grid() -> torch.Tensor:
    """All finite non-negative e4m3fn values, float64, ascending."""
    codes = torch.arange(0, 127, dtype=torch.uint8)       # 0x7F is NaN
    return codes.view(torch.float8_e4m3fn).double().unique()


def rne_e4m3(y: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even of |y| onto the grid (float64), sign restored, saturating at 448."""
    a = y.double().abs().clamp(max=448.0)
    i = torch.searchsorted(grid, a).clamp(1, len(grid) - 1)
    lo, hi = grid[i - 1], grid[i]
    pick_hi = (hi - a < a - lo) | ((hi - a == a - lo) & ((i % 2) == 0))   # even code = even mantissa
    r = torch.where(a >= hi, hi, torch.where(pick_hi, hi, lo))
    return torch.where(y < 0, -r, r)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32760)
    ap.add_argument("--k", type=int, default=5120)
    ap.add_argument("--show", type=int, default=12)
    a = ap.parse_args(argv)
    from wanimate.kernels import quant_act
    from wanimate.quant.act import per_token_quant_ref
    x = torch.randn(a.rows, a.k, device="cuda", generator=torch.Generator("cuda").manual_seed(a.k)).to(torch.bfloat16)
    q_ref, s_ref = per_token_quant_ref(x, False)
    amax = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12)
    y = x.float() * torch.div(torch.full_like(amax, 448.0), amax)
    grid = e4m3_grid().cuda()
    for variant in ("chunk", "row"):
        q, s = quant_act.per_token_quant_triton(x, False, variant=variant)
        bad = (q.view(torch.uint8) != q_ref.view(torch.uint8)).nonzero()
        print(f"variant={variant}: {len(bad)} mismatched of {x.numel()}, scales equal: {torch.equal(s, s_ref)}")
        for r, c in bad[: a.show].tolist():
            yv = y[r, c].item()
            exact = rne_e4m3(y[r, c:c + 1], grid).item()
            kq, rq = q[r, c].float().item(), q_ref[r, c].float().item()
            print(f"  y={yv!r} ({struct.unpack('<I', struct.pack('<f', yv))[0]:#010x}) kernel={kq!r} "
                  f"reference={rq!r} rne={exact!r} -> {'kernel' if kq == exact else 'reference' if rq == exact else 'neither'}")
        if len(bad):
            ys = y[bad[:, 0], bad[:, 1]]
            cast = ys.to(torch.float8_e4m3fn).double()
            print(f"  torch's CUDA cast equals float64 RNE on these y: {torch.equal(cast, rne_e4m3(ys, grid))}")


if __name__ == "__main__":
    main()
