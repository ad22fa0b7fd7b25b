"""engine/offload.py: block swap (bitwise output, copy/compute ordering under a fake asynchronous
transport), component offload, the VRAM planner, budgets, and OOM recovery in the pipeline."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from wanimate.engine.config import preset
from wanimate.engine.errors import ResourceExhausted, ValidationError
from wanimate.engine.loader import recipe_dit
from wanimate.engine.offload import (
    ComponentOffload, Placement, _group_for_arenas, _pow2ceil, apply_block_swap, dit_units,
    parse_budget, streamed_block_indices,
)

TINY = preset("tiny")


# ----------------------------------------------------------------------------------------------
# A fake transport: copies are queued and run as late as possible ("lazy": when someone waits on
# them) or as early as possible ("eager": at enqueue). Every operation is logged with a tick, so the
# ordering invariants can be checked independently of the scheduler's own bookkeeping.


class FakeEvent:
    def __init__(self):
        self.recorded_at = None       # tick of record() (compute side) or of the copy's enqueue
        self.done = False


class FakeTransport:
    name = "fake"

    def __init__(self, mode: str):
        self.mode, self.tick, self.log, self.queue = mode, 0, [], []

    def _now(self):
        self.tick += 1
        return self.tick

    def new_event(self):
        return FakeEvent()

    def record(self, ev):
        ev.recorded_at, ev.done = self._now(), True        # CPU compute is already finished
        self.log.append(("record", ev, ev.recorded_at))

    def wait(self, ev):
        assert ev is not None and ev.recorded_at is not None, "waiting on an event nobody recorded"
        while not ev.done:
            self._run_next()
        self.log.append(("wait", ev, self._now()))

    def copy(self, dst, src, after, done):
        # CUDA semantics: waiting on an event that was never recorded is a silent no-op, so a copy
        # must only ever be ordered after an event that has been recorded.
        assert after is None or after.recorded_at is not None, "copy ordered after an unrecorded event"
        done.recorded_at = self._now()
        self.log.append(("copy", dst.data_ptr(), src.data_ptr(), after, done, done.recorded_at))
        self.queue.append((dst, src, done))
        if self.mode == "eager":
            self._run_next()

    def _run_next(self):
        dst, src, done = self.queue.pop(0)
        dst.copy_(src)
        done.done = True

    def synchronize(self):
        while self.queue:
            self._run_next()


def _inputs(model, lat_t=2, h=4, w=4, seed=0, batch=1):
    """DiT inputs; the motion and context tokens (not streamed) are computed once, up front."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    face = torch.rand(batch, 3, 4 * lat_t - 3, 64, 64, generator=g) * 2 - 1
    ctx = [torch.randn(5 + i, cfg.text_dim, generator=g) for i in range(batch)]
    clip = torch.randn(batch, 257, cfg.image_dim, generator=g)
    with torch.no_grad():
        motion = model.encode_motion(face)
        tokens = model.embed_context(ctx, clip)
    return dict(
        y=torch.randn(batch, 20, lat_t + 1, h, w, generator=g),
        pose=torch.randn(batch, 16, lat_t, h, w, generator=g),
        motion=motion, tokens=tokens,
        lat=torch.randn(batch, 16, lat_t + 1, h, w, generator=g),
        t=torch.tensor([700 - 100 * i for i in range(batch)]),
    )


def _run(model, x, steps=2):
    """prepare (the leaf-hook path) + `steps` denoise calls (the block-hook path); every output."""
    with torch.no_grad():
        cond = model.prepare(x["y"], x["pose"], motion=x["motion"], context_tokens=x["tokens"])
        return [model.denoise(x["lat"], x["t"] - 50 * i, cond) for i in range(steps)]


def _same_bits(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.fixture(scope="module")
def tiny_dit():
    return recipe_dit(TINY.dit, 1234)


@pytest.fixture(scope="module")
def tiny_dit_bf16():
    # bf16 weights: the reference-precision path with its fp32 residual stream after block 0.
    return recipe_dit(TINY.dit, 1234, dtype=torch.bfloat16)


def _check_ordering(log, uses, slot_ranges, host_of):
    """Invariants of double buffering, from the transport log and the observed slot reads.
    A: a read of slot s by unit u happens after a wait on the latest copy into s, which carried u.
    B: a copy into slot s is ordered after an event recorded after every earlier read of s."""
    def slot_of(ptr):
        return next(k for k, (lo, hi) in enumerate(slot_ranges) if lo <= ptr < hi)

    copies = [(e[5], slot_of(e[1]), e[2], e[3], e[4]) for e in log if e[0] == "copy"]  # tick, slot, src, after, done
    waits = {id(e[1]): e[2] for e in log if e[0] == "wait"}
    for tick, unit, slot in uses:
        latest = [c for c in copies if c[1] == slot and c[0] < tick][-1]
        assert latest[2] == host_of[unit], f"unit {unit} read slot {slot} holding another unit's bytes"
        assert id(latest[4]) in waits and latest[0] < waits[id(latest[4])] < tick, \
            f"unit {unit} read slot {slot} without waiting for its copy"
    for tick, slot, _, after, _ in copies:
        earlier = [t for t, _, s in uses if s == slot and t < tick]
        if earlier:
            assert after is not None and after.recorded_at is not None, "slot refilled with no ordering event"
            assert after.recorded_at > max(earlier), "slot refilled before its last reader finished"


@pytest.mark.parametrize("mode,resident,face", [("lazy", 0, False), ("lazy", 1, True), ("eager", 2, False),
                                                ("eager", 0, True)])
def test_block_swap_ordering_and_bits(tiny_dit, mode, resident, face):
    x = _inputs(tiny_dit)
    ref = _run(tiny_dit, x, steps=3)
    fake = FakeTransport(mode)
    swap = apply_block_swap(tiny_dit, resident, "cpu", stream_face_blocks=face, transport=fake)
    try:
        slot_ranges = [(s.flat.data_ptr(), s.flat.data_ptr() + s.flat.numel()) for s in swap.slots]
        host_of = {i: f.data_ptr() for i, f in enumerate(swap._host_flat)}
        uses = []

        def observe(i, unit):
            # Registered after the swap's hooks: sees the unit bound, as the compute will.
            p = next(unit.parameters())
            ptr = p.data_ptr()
            if any(lo <= ptr < hi for lo, hi in slot_ranges):
                slot = next(k for k, (lo, hi) in enumerate(slot_ranges) if lo <= ptr < hi)
                uses.append((fake._now(), i, slot))
            else:
                uses.append((fake._now(), i, None))

        handles = []
        for i, unit in enumerate(swap.units):
            handles.append(unit.register_forward_pre_hook(lambda m, a, i=i, u=unit: observe(i, u)))
            handles.append(unit.register_forward_hook(lambda m, a, o, i=i, u=unit: observe(i, u), prepend=True))
            for sub in unit.modules():
                if sub is not unit and list(sub.parameters(recurse=False)):
                    handles.append(sub.register_forward_pre_hook(lambda m, a, i=i, u=unit: observe(i, u)))
        got = _run(tiny_dit, x, steps=3)
        for h in handles:
            h.remove()
    finally:
        swap.remove()
    assert len(got) == 3 and all(_same_bits(g, r) for g, r in zip(got, ref))
    assert uses and all(s is not None for _, _, s in uses), "a streamed unit computed from host memory"
    _check_ordering(fake.log, uses, slot_ranges, host_of)
    n_streamed = len(streamed_block_indices(len(tiny_dit.blocks), resident)) + (TINY.dit.num_face_blocks if face else 0)
    assert len(swap.units) == n_streamed


def test_fake_transport_catches_a_missing_wait(tiny_dit):
    """The lazy fake must expose a scheduler that computes without waiting for the copy."""
    class NoWait(FakeTransport):
        def wait(self, ev):
            self.log.append(("wait", ev, self._now()))

    x = _inputs(tiny_dit)
    ref = _run(tiny_dit, x)
    swap = apply_block_swap(tiny_dit, 0, "cpu", transport=NoWait("lazy"))
    try:
        got = _run(tiny_dit, x)
    finally:
        swap.remove()
    assert not all(_same_bits(g, r) for g, r in zip(got, ref))


@pytest.mark.parametrize("resident", [0, 4])
def test_block_swap_bitwise_bf16_and_remove(tiny_dit_bf16, resident):
    model = tiny_dit_bf16
    x = _inputs(model, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _run(model, x)
    swap = apply_block_swap(model, resident, "cpu", stream_face_blocks=resident == 0)
    got = _run(model, x)
    # The streamed blocks' parameters live in the host arena between uses, in a slot while in use.
    streamed = set(streamed_block_indices(len(model.blocks), resident))
    arena = [(a.data_ptr(), a.data_ptr() + a.numel()) for a in swap._arenas]
    for i in streamed:
        ptr = model.blocks[i].self_attn.q.weight.data_ptr()
        assert any(lo <= ptr < hi for lo, hi in arena)
    swap.remove()
    assert all(_same_bits(g, r) for g, r in zip(got, ref))
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_block_swap_after_interrupted_forward(tiny_dit):
    """An exception inside a streamed block leaves a unit bound; reset() (what OOM recovery calls)
    and the next forward must still give the right answer."""
    x = _inputs(tiny_dit, seed=5)
    ref = _run(tiny_dit, x)
    swap = apply_block_swap(tiny_dit, 1, "cpu")
    calls = {"n": 0}

    def boom(m, a):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
    h = swap.units[2].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            _run(tiny_dit, x)
        swap.reset()
        got = _run(tiny_dit, x)
    finally:
        h.remove()
        swap.remove()
    assert all(_same_bits(g, r) for g, r in zip(got, ref))


def test_block_swap_selection_and_errors(tiny_dit):
    assert streamed_block_indices(40, 40) == []
    assert streamed_block_indices(40, 0) == list(range(40))
    s = streamed_block_indices(40, 30)
    assert len(s) == 10 and all(b - a == 4 for a, b in zip(s, s[1:]))   # spread evenly
    for k in range(41):
        assert len(streamed_block_indices(40, k)) == 40 - k
    names = [n for n, _ in dit_units(tiny_dit, face_blocks=True)]
    assert names[:3] == ["blocks.0", "face_adapter.fuser_blocks.0", "blocks.1"]
    for bad in (-1, 6, 2.0, True):
        with pytest.raises(ValidationError, match="resident blocks"):
            apply_block_swap(tiny_dit, bad, "cpu")
    with pytest.raises(ValidationError, match="transport"):
        apply_block_swap(tiny_dit, 1, "cpu", transport="warp")
    with pytest.raises(ValidationError, match="CUDA device"):
        apply_block_swap(tiny_dit, 1, "cpu", transport="cuda-stream")
    assert not any(m._forward_pre_hooks for m in tiny_dit.modules())


def test_arena_grouping_wastes_little():
    block = 807_677_952                         # one 14B DiT block in bf16
    groups = _group_for_arenas([block] * 38, 8 * 2**30)
    assert [i for g in groups for i in g] == list(range(38))
    used = sum(_pow2ceil(len(g) * block) for g in groups)
    assert used < 1.15 * 38 * block
    assert _group_for_arenas([5, 5, 5], 8) == [[0], [1], [2]]   # a unit larger than half an arena
    assert _group_for_arenas([], 8) == []


# ----------------------------------------------------------------------------------------------
# Budgets


@pytest.mark.parametrize("text,want", [("24GB", 24 * 10**9), ("24 gb", 24 * 10**9), ("23.5GiB", int(23.5 * 2**30)),
                                       ("24000MB", 24 * 10**9), ("16", 16 * 10**9), ("1.5TB", 15 * 10**11),
                                       (24 * 10**9, 24 * 10**9)])
def test_parse_budget(text, want):
    assert parse_budget(text) == want


@pytest.mark.parametrize("text", ["", "GB", "24 parsecs", "-3GB", "1e3GB", "0.1GB", True, "24GB24"])
def test_parse_budget_errors(text):
    with pytest.raises(ValidationError, match="vram-budget"):
        parse_budget(text)


# ----------------------------------------------------------------------------------------------
# Component offload and the pipeline's hook points


def test_component_offload_moves_only_inside_use():
    lin = torch.nn.Sequential(torch.nn.Linear(8, 300), torch.nn.GELU(), torch.nn.Linear(300, 4))
    other = torch.nn.Linear(3, 3)
    x = torch.randn(2, 8)
    want = lin(x)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    placement = ComponentOffload({"mlp": lin}, "cpu")
    host = {id(p): p.data_ptr() for p in lin.parameters()}
    arena = [(a.data_ptr(), a.data_ptr() + a.numel()) for e in placement._entries.values() for a in e.arenas]
    assert all(any(lo <= ptr < hi for lo, hi in arena) for ptr in host.values())
    with placement.use(lin):
        inside = {id(p): p.data_ptr() for p in lin.parameters()}
        with placement.use(lin):                                # nested: no second move
            assert {id(p): p.data_ptr() for p in lin.parameters()} == inside
        assert {id(p): p.data_ptr() for p in lin.parameters()} == inside
        got = lin(x)
    assert all(inside[k] != host[k] for k in host)              # it ran from the "device" copy
    assert {id(p): p.data_ptr() for p in lin.parameters()} == host
    assert torch.equal(got, want)
    with placement.use(other):                                  # not offloaded: left alone
        pass
    with pytest.raises(RuntimeError):
        with placement.use(lin):
            raise RuntimeError("inside")
    assert {id(p): p.data_ptr() for p in lin.parameters()} == host
    assert placement.offloaded == ["mlp"] and "mlp" in placement.describe()
    placement.remove()
    assert all(torch.equal(lin.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(lin(x), want)


def test_default_placement_is_a_no_op():
    p = Placement()
    m = torch.nn.Linear(2, 2)
    with p.use(m) as got:
        assert got is m
    p.recover()
    assert p.vae_tiling is None and p.describe() == "all components resident"


@pytest.fixture(scope="module")
def tiny_pipe():
    from wanimate.engine.components import embedded_pipeline
    return embedded_pipeline()


@pytest.fixture(scope="module")
def good_frames(tiny_pipe):
    """The tiny pipeline's output for the standard request, everything resident."""
    return _generate(tiny_pipe).frames


def _request(n=5, size=32, seed=0):
    from wanimate.engine.pipeline import ArraySource
    rng = np.random.default_rng(seed)
    ref = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    pose = ArraySource(rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8))
    face = ArraySource(rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8))
    return ref, pose, face


def _generate(pipe, steps=1, **kw):
    from wanimate.engine.pipeline import GenerateOptions
    ref, pose, face = _request()
    return pipe.generate(ref, pose, face, GenerateOptions(steps=steps, clip_len=5, seed=7, **kw))


def _tensors_created_during(fn):
    """Run fn; return (its result or exception, weak references to every tensor ops created)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    refs = []

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, torch.Tensor):
                    refs.append(weakref.ref(o))
            return out

    with Track():
        try:
            return fn(), refs
        except Exception as e:          # noqa: BLE001 - returned to the test
            return e, refs


def _inject_oom(module, at_call):
    calls = {"n": 0}

    def hook(m, args):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB. (injected)")
    return module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("where,offload", [("dit", False), ("vae", True)])
def test_oom_recovery_leaves_the_pipeline_healthy(tiny_pipe, good_frames, where, offload):
    pipe, good = tiny_pipe, good_frames
    placement = None
    if offload:
        swap = apply_block_swap(pipe.dit, 2, "cpu")
        placement = ComponentOffload({"text_encoder": pipe.text_encoder, "clip": pipe.clip, "vae": pipe.vae},
                                     "cpu", swap=swap)
        pipe.placement = placement
    target = pipe.dit.blocks[1] if where == "dit" else pipe.vae.decoder
    handle = _inject_oom(target, at_call=1)
    try:
        err, refs = _tensors_created_during(lambda: _generate(pipe))
        assert isinstance(err, ResourceExhausted), err
        msg = str(err)
        assert ("DiT step 1/1" if where == "dit" else "VAE decode") in msg and "32x32" in msg
        assert "injected" in msg and "--vram-budget" in msg and "still healthy" in msg
        assert err.__context__ is None and err.__cause__ is None
        # While the caller still holds the exception, every tensor of the failed request is gone
        # (the pipeline's own per-shape caches excepted).
        gc.collect()
        cached = {t.untyped_storage().data_ptr() for t in [*pipe._grey_latents.values(), *pipe._black_motion.values()]}
        alive = [r() for r in refs if r() is not None]
        leaked = [t for t in alive if t.numel() and t.untyped_storage().data_ptr() not in cached]
        assert not leaked, [(tuple(t.shape), t.dtype) for t in leaked[:5]]
        if offload:
            assert all(e.depth == 0 and e.device_flats is None for e in placement._entries.values())
            assert not any(s.bound for s in swap.slots)
    finally:
        handle.remove()
    try:
        again = _generate(pipe).frames
    finally:
        if offload:
            placement.remove()
            pipe.placement = Placement()
    assert torch.equal(again, good)


# ----------------------------------------------------------------------------------------------
# The planner


@pytest.fixture(scope="module")
def sizes14b():
    from wanimate.engine.offload import component_sizes
    return component_sizes(preset("14b"), "bf16")


def test_component_sizes_match_the_manifest(sizes14b):
    """Weights as counted on meta-built modules: 17.27B DiT parameters in bf16 (reference manifest)."""
    s = sizes14b
    assert s.num_blocks == 40 and s.num_face_blocks == 8
    assert s.block == 403_838_464 * 2 and s.face_block == 104_878_336 * 2
    assert 0 <= s.dit - 17_274_816_884 * 2 < 1024            # + the motion encoder's blur-kernel buffers
    assert 11.3e9 < s.text_encoder < 11.4e9 and 1.2e9 < s.clip < 1.25e9 and 0.5e9 < s.vae < 0.52e9


def test_plan_everything_resident_when_it_fits(sizes14b):
    from wanimate.engine.offload import plan_vram
    p = plan_vram(80 * 10**9, preset("14b"), "480p", sizes=sizes14b)
    assert p.resident_blocks == 40 and not p.streams_blocks and p.offload == () and p.vae_tiling is None
    assert p.peak_bytes <= p.budget_bytes - p.headroom
    assert "40/40" in p.summary() and p.to_dict()["peak_bytes"] == p.peak_bytes


def test_plan_24gb_480p_streams_and_offloads(sizes14b):
    from wanimate.engine.offload import plan_vram
    p = plan_vram("24GB", preset("14b"), "480p", sizes=sizes14b)
    assert p.streams_blocks and "text_encoder" in p.offload and 0 <= p.resident_blocks < 40
    assert p.peak_bytes <= p.budget_bytes - p.headroom
    # Greedy but not wasteful: one more resident block would not fit.
    from wanimate.engine.offload import MemoryModel, estimate_phases
    more = estimate_phases(sizes14b, MemoryModel(), preset("14b"), p.size, p.frames, p.dtype, p.batch,
                           p.resident_blocks + 1, p.stream_face_blocks, p.offload, p.vae_tiling)
    assert max(more.values()) > p.budget_bytes - p.headroom


def test_plan_is_monotone_in_budget(sizes14b):
    """More budget never means fewer resident blocks or a less faithful VAE."""
    from wanimate.engine.offload import plan_vram
    from wanimate.engine.offload import min_vram
    need, _ = min_vram(preset("14b"), "480p", sizes=sizes14b)
    first = -(-need // 10**9)                     # the smallest whole-GB budget that fits
    plans = [plan_vram(b * 10**9, preset("14b"), "480p", sizes=sizes14b) for b in range(first, 90, 4)]
    # The official fp32 VAE whenever it fits; the bf16 VAE only below every budget that fits fp32.
    dtypes = [p.vae_dtype for p in plans]
    assert dtypes == sorted(dtypes, key=lambda d: d == "float32") and dtypes[-1] == "float32"
    ks = [p.resident_blocks for p in plans if p.vae_dtype == "float32"]
    assert ks == sorted(ks) and ks[0] < 40 == ks[-1]
    with pytest.raises(ResourceExhausted):
        plan_vram((first - 1) * 10**9, preset("14b"), "480p", sizes=sizes14b)


def test_plan_fails_early_naming_what_fits(sizes14b):
    import re
    from wanimate.engine.offload import plan_vram
    with pytest.raises(ResourceExhausted) as e:
        plan_vram("24GB", preset("14b"), "720p", sizes=sizes14b)
    msg = str(e.value)
    assert "720p" in msg and "needs" in msg and "480p (needs" in msg and "VAE decode" in msg
    need = int(re.search(r"--vram-budget (\d+)GB", msg)[1])
    assert plan_vram(need * 10**9, preset("14b"), "720p", sizes=sizes14b).streams_blocks
    with pytest.raises(ResourceExhausted):
        plan_vram((need - 1) * 10**9, preset("14b"), "720p", sizes=sizes14b)
    n480 = float(re.search(r"480p \(needs ([\d.]+) GB", msg)[1])
    plan_vram(int((n480 + 0.1) * 1e9), preset("14b"), "480p", sizes=sizes14b)   # the suggestion holds
    with pytest.raises(ResourceExhausted, match="guidance passes one after the other"):
        plan_vram("14GB", preset("14b"), "480p", batch=2, sizes=sizes14b)


def test_plan_validation(sizes14b):
    from wanimate.engine.offload import parse_resolution, plan_vram
    cfg = preset("14b")
    for kw, match in [(dict(frames=76), "4n\\+1"), (dict(batch=3), "batch"), (dict(dtype="int8"), "dtype"),
                      (dict(resolution="1080i"), "resolution"), (dict(resolution="833x480"), "multiples of 16")]:
        args = dict(budget_bytes=40 * 10**9, config=cfg, resolution="480p", sizes=sizes14b) | kw
        with pytest.raises(ValidationError, match=match):
            plan_vram(**args)
    assert parse_resolution("832x480") == (480, 832) == parse_resolution("480p") == parse_resolution((480, 832))


def test_memory_model_json_round_trip(tmp_path):
    from wanimate.engine.offload import MemoryModel
    m = MemoryModel(vae_decode_per_px=1.0, dit_act_per_token_dim=(("bfloat16", 27.5),), source="test")
    path = tmp_path / "m.json"
    path.write_text(__import__("json").dumps({"memory_model": m.to_json()}))
    assert MemoryModel.from_json(path) == m and m.dit_act("bfloat16") == 27.5


def test_memory_model_defaults_match_a_trace_of_the_code():
    """The DiT activation default must stay what the engine's own code allocates (re-trace at the
    real 14B shapes on the meta device: a change to model.py that moves the peak shows up here)."""
    from wanimate.bench.memtrace import trace_dit
    from wanimate.engine.offload import MemoryModel
    got = trace_dit(preset("14b").dit, (480, 832), 77, torch.bfloat16)
    assert got["tokens"] == 32760
    assert abs(got["per_token_dim"] - MemoryModel().dit_act("bfloat16")) < 0.5


def test_apply_plan_to_a_pipeline(tiny_pipe, good_frames):
    import dataclasses
    from wanimate.engine.offload import OFFLOADABLE, apply_plan, plan_vram
    from wanimate.engine.vae import Tiling
    pipe, good = tiny_pipe, good_frames
    base = plan_vram(4 * 10**9, TINY, (32, 32), frames=5, dtype=torch.float32)
    assert base.resident_blocks == len(pipe.dit.blocks) and base.offload == ()
    plan = dataclasses.replace(base, resident_blocks=2, stream_face_blocks=True, offload=OFFLOADABLE)
    placement = apply_plan(pipe, plan)
    try:
        assert pipe.placement is placement and placement.swap is not None
        assert "DiT blocks resident 2/5" in placement.describe()
        assert torch.equal(_generate(pipe).frames, good)
    finally:
        placement.remove()
    assert isinstance(pipe.placement, Placement) and not isinstance(pipe.placement, ComponentOffload)
    tiled = apply_plan(pipe, dataclasses.replace(base, vae_tiling=Tiling(2, 1)))
    try:
        out = _generate(pipe).frames
    finally:
        tiled.remove()
    assert out.shape == good.shape and not torch.equal(out, good)     # the tiling reached the VAE


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_swap_on_cuda_is_bitwise(dtype):
    from wanimate.engine.offload import CudaStreamTransport
    model = recipe_dit(TINY.dit, 1234, dtype=dtype)
    x = {k: v.cuda() for k, v in _inputs(model).items()}
    model.to("cuda")
    ref = _run(model, x, steps=3)
    swap = apply_block_swap(model, 1, "cuda", stream_face_blocks=True)
    try:
        assert isinstance(swap.transport, CudaStreamTransport)
        assert all(a.is_pinned() for a in swap._arenas)
        got = _run(model, x, steps=3)
        torch.cuda.synchronize()
    finally:
        swap.remove()
    assert all(_same_bits(g.cpu(), r.cpu()) for g, r in zip(got, ref))
    assert swap.stats.copies > len(swap.units) and all(p.is_cuda for p in model.parameters())


def test_apply_budget_plans_from_the_loaded_pipeline(tiny_pipe):
    from wanimate.engine.offload import apply_budget, pipeline_sizes
    from wanimate.engine.pipeline import GenerateOptions
    sizes = pipeline_sizes(tiny_pipe)
    assert sizes.num_blocks == 5 and sizes.block == sum(p.numel() * 4 for p in tiny_pipe.dit.blocks[0].parameters())
    assert sizes.dit == sum(t.numel() * t.element_size() for t in [*tiny_pipe.dit.parameters(), *tiny_pipe.dit.buffers()])
    lines = []
    placement = apply_budget(tiny_pipe, "8GB", (32, 32), GenerateOptions(clip_len=5, guide_scale=2.0), log=lines.append)
    try:
        assert "40" not in lines[0] and "5/5" in lines[0] and tiny_pipe.placement is placement
    finally:
        placement.remove()
    with pytest.raises(ResourceExhausted, match="not enough"):
        apply_budget(tiny_pipe, 10**8, (32, 32), GenerateOptions(clip_len=5))


def test_pipeline_computes_on_its_device_with_weights_elsewhere(tiny_pipe, good_frames):
    """apply_budget places weights that were loaded elsewhere (load_pipeline(weights_device=...))."""
    from wanimate.engine.offload import apply_budget
    from wanimate.engine.pipeline import GenerateOptions, Pipeline
    pipe = Pipeline(tiny_pipe.dit, tiny_pipe.vae, tiny_pipe.clip, text_encoder=tiny_pipe.text_encoder,
                    tokenizer=tiny_pipe.tokenizer, device="cpu")
    placement = apply_budget(pipe, "2GB", (32, 32), GenerateOptions(clip_len=5))
    try:
        assert torch.equal(_generate(pipe).frames, good_frames)
    finally:
        placement.remove()


def test_tight_budget_moves_t5_to_host_then_vae_to_bf16(sizes14b):
    """Below what the official setup fits, the planner first runs T5 on the host (the official
    --t5_cpu, same numerics), and only then the VAE in bf16 (the one step off the official
    numerics), and says both in its summary."""
    from wanimate.engine.offload import plan_vram
    roomy = plan_vram("48GB", preset("14b"), "480p", sizes=sizes14b)
    assert not roomy.t5_on_cpu and roomy.vae_dtype == "float32"
    tight = plan_vram("16GB", preset("14b"), "480p", sizes=sizes14b)
    assert tight.t5_on_cpu and tight.vae_dtype == "bfloat16"
    assert "T5 on the CPU" in tight.summary() and "VAE in bfloat16" in tight.summary()
    assert "text encoder" in tight.phases and tight.peak_bytes <= tight.budget_bytes


def test_apply_plan_keeps_t5_on_host_and_casts_the_vae(tiny_pipe):
    import dataclasses
    from wanimate.engine.offload import apply_plan, plan_vram
    pipe, _ = tiny_pipe, None
    plan = plan_vram("64GB", preset("tiny"), (32, 48), 5)
    plan = dataclasses.replace(plan, t5_on_cpu=True, vae_dtype="bfloat16")
    placement = apply_plan(pipe, plan)
    try:
        assert next(pipe.text_encoder.parameters()).device.type == "cpu"
        assert pipe.vae.dtype == torch.bfloat16
    finally:
        placement.remove()
        pipe.vae.to(torch.float32)
