"""Running within a VRAM budget: transforms applied to a built model or pipeline, each switchable.

Three pieces, from the inside out:

- `BlockSwap` (`apply_block_swap`): k of the DiT's 40 blocks stay on the GPU; the others live in
  pinned host memory and are streamed through two GPU slots on a separate CUDA stream. While a
  block computes, the next streamed block is copied into the other slot; CUDA events order copy
  against compute in both directions (a slot is refilled only after the block that used it has
  finished, and a block computes only after its copy has landed). Nothing in the loop synchronises
  the device. It is built on forward hooks (wanimate's own, removable), not on patched methods:
  a forward pre-hook on each streamed block binds its parameters to the slot it was copied into,
  a forward hook releases the slot and starts the next copy. Leaf hooks on the block's submodules
  cover calls that bypass the block's forward (`prepare()` projects the cross-attention context
  with `blocks[i].cross_attn.project_context`). The output is bitwise the same as with every block
  resident: the same kernels read the same bytes at the same alignment.
- `ComponentOffload`: T5, CLIP, the VAE (and any other module, e.g. preprocessing models) live in
  pinned host memory and are on the GPU only inside `with placement.use(module):`. The pipeline
  calls `use()` around each component call; the default `Placement` keeps everything resident.
- `plan_vram`: from the parameter bytes of each component (counted on meta-built modules) and a
  memory model of the transient peaks (DiT activations per token, VAE peaks per pixel), choose the
  resident block count, the offloaded components and VAE tiling, or raise ResourceExhausted naming
  what would fit. `apply_plan` applies a plan to a Pipeline.

Memory numbers carry their source where they are defined (`MemoryModel`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from .config import DiTConfig, ModelConfig
from .errors import ResourceExhausted, ValidationError
from .vae import Tiling

ALIGN = 512                  # byte alignment of every tensor inside a flat buffer (>= any kernel's need)
GB, GiB = 10**9, 2**30


# ----------------------------------------------------------------------------------------------
# Budgets


_UNITS = {"": GB, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": GB, "gb": GB, "gib": GiB, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_budget(text: str | int | float) -> int:
    """'24GB' -> 24 * 10^9 bytes. Units: B, KB/KiB, MB/MiB, GB/GiB, TB/TiB (decimal GB, binary GiB,
    case-insensitive); a bare number means GB. An int passes through as bytes."""
    if isinstance(text, bool):
        raise ValidationError(f"--vram-budget must be a size such as 24GB, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        unit = m[2].lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValidationError(f"--vram-budget must look like 24GB, 23.5GiB or 24000MB, got {text!r}")
        value = int(float(m[1]) * _UNITS[unit])
    if value < 2**28:
        raise ValidationError(f"--vram-budget {text!r} is {value} bytes; the engine needs at least a few GB "
                              "(e.g. 16GB, 24GB)")
    return value


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


# ----------------------------------------------------------------------------------------------
# Flat layouts: a module's tensors as views into one byte buffer


@dataclass
class _Entry:
    module: nn.Module
    name: str
    is_param: bool
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


def _owned_tensors(module: nn.Module) -> Iterator[tuple[nn.Module, str, bool, torch.Tensor]]:
    """(owner, attribute, is_parameter, tensor) for every parameter and buffer under `module`."""
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                yield sub, name, True, p
        for name, b in sub._buffers.items():
            if b is not None:
                yield sub, name, False, b


class _FlatLayout:
    """Where each of a set of tensors lives inside one flat uint8 buffer (ALIGN-aligned offsets).
    Binding points their owners' parameters and buffers at views of a buffer with this layout;
    parameters keep their identity (only `.data` changes)."""

    def __init__(self, items: Iterable[tuple[nn.Module, str, bool, torch.Tensor]], what: str):
        self.entries: list[_Entry] = []
        seen: dict[int, str] = {}
        offset = 0
        for owner, name, is_param, t in items:
            if t.is_meta:
                raise ValidationError(f"{what}: {name} is on the meta device; load or initialise the weights "
                                      "before offloading")
            if id(t) in seen:
                raise ValidationError(f"{what}: tensor {name} is shared with {seen[id(t)]}; tied weights "
                                      "cannot be offloaded block by block")
            seen[id(t)] = name
            nbytes = t.numel() * t.element_size()
            self.entries.append(_Entry(owner, name, is_param, tuple(t.shape), t.dtype, offset, nbytes))
            offset += -(-nbytes // ALIGN) * ALIGN
        self.nbytes = offset

    @classmethod
    def of(cls, module: nn.Module, what: str) -> "_FlatLayout":
        return cls(_owned_tensors(module), what)

    @classmethod
    def parts(cls, module: nn.Module, what: str, part_bytes: int = GiB) -> list["_FlatLayout"]:
        """The module's tensors in consecutive groups of about part_bytes (a tensor is never split)."""
        groups, group, size = [], [], 0
        for item in _owned_tensors(module):
            n = item[3].numel() * item[3].element_size()
            if group and size + n > part_bytes:
                groups.append(group)
                group, size = [], 0
            group.append(item)
            size += n
        if group:
            groups.append(group)
        return [cls(g, what) for g in groups]

    def tensors(self) -> list[torch.Tensor]:
        return [(e.module._parameters if e.is_param else e.module._buffers)[e.name] for e in self.entries]

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of `flat` (uint8, at least nbytes long), one per entry."""
        return [flat[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries]

    def bind(self, views: Sequence[torch.Tensor]) -> None:
        for e, v in zip(self.entries, views):
            if e.is_param:
                e.module._parameters[e.name].data = v
            else:
                e.module._buffers[e.name] = v

    def fill(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Copy the module's current tensors into `flat`, bind the module to it; returns the views."""
        views = self.views(flat)
        for v, t in zip(views, self.tensors()):
            v.copy_(t)
        self.bind(views)
        return views


def _pow2ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _group_for_arenas(sizes: Sequence[int], max_arena: int) -> list[list[int]]:
    """Split units (in order) into groups, each to become one host allocation. Pinned host memory
    comes from a caching allocator that rounds every request up to a power of two, so groups are
    filled close to a power of two: full `max_arena` groups, then a shrinking tail."""
    groups, i = [], 0
    while i < len(sizes):
        rest = sizes[i:]
        total, biggest = sum(rest), max(rest)
        cap = min(max_arena, _pow2ceil(total))
        cap = max(cap, _pow2ceil(biggest))
        while total <= cap and total < 0.75 * cap and cap // 2 >= biggest:
            cap //= 2             # the tail: pack a half-size arena first, the rest after
        group, used = [], 0
        while i < len(sizes) and (not group or used + sizes[i] <= cap):
            group.append(i)
            used += sizes[i]
            i += 1
        groups.append(group)
    return groups


def _host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)


def _pack_to_host(layouts: Sequence[_FlatLayout], pin: bool, max_arena: int = 8 * GiB,
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]]]:
    """Copy each layout's module into host arenas and bind it there. One arena at a time, so host
    memory peaks at the module's size plus one arena (the old tensors are released per unit).
    Returns (arenas, per-unit flat byte slices, per-unit host views)."""
    arenas, flats, views = [], [None] * len(layouts), [None] * len(layouts)
    for group in _group_for_arenas([lay.nbytes for lay in layouts], max_arena):
        arena = _host_buffer(sum(layouts[i].nbytes for i in group), pin)
        offset = 0
        for i in group:
            flat = arena[offset:offset + layouts[i].nbytes]
            views[i] = layouts[i].fill(flat)
            flats[i] = flat
            offset += layouts[i].nbytes
        arenas.append(arena)
    return arenas, flats, views


# ----------------------------------------------------------------------------------------------
# Transports: how bytes move to the device and how copy and compute are ordered.
#
# The scheduler talks to one of these only: `copy(dst, src, after, done)` enqueues a copy that
# starts after event `after` and records `done` when finished; `record(ev)` marks the compute
# stream's current position; `wait(ev)` makes compute wait for an event. Tests drive the scheduler
# with a fake transport that delays copies, to check the ordering without a GPU.


class SameStreamTransport:
    """Copies on the compute stream itself: correct with no events, but copy and compute never
    overlap (what kijai's block swap does). The CPU path, and an ablation on the GPU."""

    name = "same-stream"

    def __init__(self, device: torch.device):
        self.device = device

    def new_event(self):
        return None

    def record(self, event) -> None:
        pass

    def wait(self, event) -> None:
        pass

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after, done) -> None:
        dst.copy_(src, non_blocking=src.is_pinned())

    def synchronize(self) -> None:
        pass


class CudaStreamTransport:
    """Copies on a dedicated CUDA stream, ordered against the compute stream with events."""

    name = "cuda-stream"

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def new_event(self):
        return torch.cuda.Event()

    def record(self, event) -> None:
        event.record(torch.cuda.current_stream(self.device))

    def wait(self, event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after, done) -> None:
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            done.record(self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


def make_transport(kind: str, device: torch.device):
    """'auto': a CUDA copy stream on CUDA devices, same-stream copies elsewhere."""
    if kind == "auto":
        kind = "cuda-stream" if device.type == "cuda" else "same-stream"
    if kind == "cuda-stream":
        if device.type != "cuda":
            raise ValidationError(f"a CUDA copy stream needs a CUDA device, got {device}")
        return CudaStreamTransport(device)
    if kind == "same-stream":
        return SameStreamTransport(device)
    raise ValidationError(f"unknown block-swap transport {kind!r}; choose auto, cuda-stream or same-stream")


# ----------------------------------------------------------------------------------------------
# Block swap


@dataclass
class _Slot:
    flat: torch.Tensor                 # device uint8 buffer, the size of the largest streamed unit
    unit: int | None = None            # unit whose bytes are in (or on their way into) this slot
    bound: bool = False                # the unit's parameters currently point into this slot
    ready: object = None               # event: the copy of `unit` has landed
    free: object = None                # event: compute that read this slot has finished
    last_use: int = -1


@dataclass
class SwapStats:
    copies: int = 0
    bytes_copied: int = 0
    demand_loads: int = 0              # loads not prefetched ahead of use (the first, or out of order)


class BlockSwap:
    """Streams `units` (modules called one after another, in this order, once per forward) through
    two device slots; every other tensor of `model` is moved to `device`. See the module docstring.

    `remove()` restores every tensor to the device it was on before (so it is the inverse);
    `reset()` forgets bindings after an interrupted forward (an exception inside a block)."""

    def __init__(self, model: nn.Module, units: Sequence[nn.Module], device: torch.device | str,
                 transport: str | object = "auto", names: Sequence[str] | None = None):
        self.model, self.units = model, list(units)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.names = list(names) if names is not None else [f"unit {i}" for i in range(len(self.units))]
        self.transport = make_transport(transport, self.device) if isinstance(transport, str) else transport
        self.stats = SwapStats()
        self._origin = {(id(owner), name): t.device for owner, name, _, t in _owned_tensors(model)}
        self._hooks: list = []
        self._active: int | None = None
        self._clock = 0
        with torch.no_grad(), torch.inference_mode(False):
            unit_ids = {id(m) for u in self.units for m in u.modules()}
            for owner, name, is_param, t in _owned_tensors(model):   # the rest goes to the device
                if id(owner) not in unit_ids and t.device != self.device:
                    if is_param:
                        t.data = t.data.to(self.device)
                    else:
                        owner._buffers[name] = t.to(self.device)
            self.layouts = [_FlatLayout.of(u, self.names[i]) for i, u in enumerate(self.units)]
            pin = self.device.type == "cuda"
            self._arenas, self._host_flat, self._host_views = _pack_to_host(self.layouts, pin)
            slot_bytes = max((lay.nbytes for lay in self.layouts), default=0)
            n_slots = min(2, len(self.units))
            self.slots = [_Slot(torch.empty(slot_bytes, dtype=torch.uint8, device=self.device))
                          for _ in range(n_slots)]
            self._slot_views = [[lay.views(s.flat) for s in self.slots] for lay in self.layouts]
        self._slot_of: dict[int, int] = {}
        for i, unit in enumerate(self.units):
            self._hooks.append(unit.register_forward_pre_hook(lambda m, a, i=i: self._pre_forward(i)))
            self._hooks.append(unit.register_forward_hook(lambda m, a, o, i=i: self._post_forward(i)))
            for sub in unit.modules():
                if sub is not unit and (any(p is not None for p in sub._parameters.values())
                                        or any(b is not None for b in sub._buffers.values())):
                    self._hooks.append(sub.register_forward_pre_hook(lambda m, a, i=i: self._leaf_call(i)))
        for i in range(len(self.slots)):                # the first units start copying now
            self._load(i, i)

    # -- sizes ------------------------------------------------------------------------------------

    @property
    def slot_bytes(self) -> int:
        return sum(s.flat.numel() for s in self.slots)

    @property
    def host_bytes(self) -> int:
        return sum(lay.nbytes for lay in self.layouts)

    # -- hooks ------------------------------------------------------------------------------------

    def _pre_forward(self, i: int) -> None:
        self._active = i
        self._ensure(i)
        self._prefetch_after(i)

    def _post_forward(self, i: int) -> None:
        self._release(i)
        if self._active == i:
            self._active = None
        self._prefetch_after(i)

    def _leaf_call(self, i: int) -> None:
        s = self._slot_of.get(i)
        if s is not None and self.slots[s].bound:
            return
        self._ensure(i)
        self._prefetch_after(i)

    # -- scheduling -------------------------------------------------------------------------------

    def _upcoming(self, i: int, n: int = 2) -> list[int]:
        """The next n distinct units after unit i in (cyclic) call order, i excluded."""
        count = len(self.units)
        return [(i + k) % count for k in range(1, min(n, count - 1) + 1)]

    def _ensure(self, i: int) -> None:
        """Make unit i's parameters point at a slot holding its bytes, compute ordered after the copy."""
        for s, slot in enumerate(self.slots):       # a bound unit outside its forward is finished
            if slot.bound and slot.unit != i and slot.unit != self._active:
                self._release(slot.unit)
        s = self._slot_of.get(i)
        if s is None:
            upcoming = self._upcoming(i)
            s = min((k for k, slot in enumerate(self.slots) if not slot.bound),
                    key=lambda k: (self.slots[k].unit in upcoming, self.slots[k].last_use))
            self._load(i, s)
            self.stats.demand_loads += 1
        slot = self.slots[s]
        if not slot.bound:
            self.transport.wait(slot.ready)
            self.layouts[i].bind(self._slot_views[i][s])
            slot.bound = True
        self._clock += 1
        slot.last_use = self._clock

    def _release(self, i: int) -> None:
        s = self._slot_of.get(i)
        if s is None or not self.slots[s].bound:
            return
        slot = self.slots[s]
        slot.free = self.transport.new_event()
        self.transport.record(slot.free)
        self.layouts[i].bind(self._host_views[i])
        slot.bound = False

    def _load(self, i: int, s: int) -> None:
        slot = self.slots[s]
        if slot.bound:
            self._release(slot.unit)
        if slot.unit is not None:
            del self._slot_of[slot.unit]
        slot.unit, slot.ready = i, self.transport.new_event()
        self._slot_of[i] = s
        n = self.layouts[i].nbytes
        self.transport.copy(slot.flat[:n], self._host_flat[i], slot.free, slot.ready)
        self.stats.copies += 1
        self.stats.bytes_copied += n

    def _prefetch_after(self, i: int) -> None:
        """Start copying the units that come next, into slots nobody is using."""
        upcoming = self._upcoming(i)
        for rank, u in enumerate(upcoming):
            if u in self._slot_of:
                continue
            sooner = set(upcoming[:rank])
            free = [k for k, slot in enumerate(self.slots) if not slot.bound and slot.unit not in sooner]
            if not free:
                return
            self._load(u, min(free, key=lambda k: self.slots[k].last_use))

    # -- lifecycle --------------------------------------------------------------------------------

    def reset(self) -> None:
        """Release every binding (after an exception inside a forward); loaded bytes stay valid."""
        for slot in self.slots:
            if slot.bound:
                self._release(slot.unit)
        self._active = None

    def remove(self) -> None:
        """Remove the hooks and put every tensor back on the device it came from."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.transport.synchronize()
        self.reset()
        with torch.no_grad(), torch.inference_mode(False):
            for lay, views in zip(self.layouts, self._host_views):
                lay.bind([v.to(self._origin[(id(e.module), e.name)], copy=True) for e, v in zip(lay.entries, views)])
            for owner, name, is_param, t in _owned_tensors(self.model):
                home = self._origin.get((id(owner), name))
                if home is not None and t.device != home:
                    if is_param:
                        t.data = t.data.to(home)
                    else:
                        owner._buffers[name] = t.to(home)
        self.slots, self._arenas, self._host_flat, self._host_views, self._slot_views = [], [], [], [], []
        self._slot_of.clear()


def dit_units(model: nn.Module, face_blocks: bool = False) -> list[tuple[str, nn.Module]]:
    """The DiT's swappable units in the order denoise() calls them: block i, then face block
    i // every after every `face_adapter_every`-th block (engine/model.py)."""
    every = model.cfg.face_adapter_every
    units = []
    for i, block in enumerate(model.blocks):
        units.append((f"blocks.{i}", block))
        if face_blocks and i % every == 0:
            units.append((f"face_adapter.fuser_blocks.{i // every}", model.face_adapter.fuser_blocks[i // every]))
    return units


def streamed_block_indices(num_blocks: int, resident: int) -> list[int]:
    """Which blocks to stream when `resident` stay: spread evenly, so every copy has the compute of
    the resident blocks around it to hide behind."""
    m = num_blocks - resident
    return sorted({int((j + 0.5) * num_blocks / m) for j in range(m)}) if m > 0 else []


def apply_block_swap(model: nn.Module, resident: int, device: torch.device | str, *,
                     stream_face_blocks: bool = False, transport: str | object = "auto") -> BlockSwap:
    """Keep `resident` of the DiT's blocks on `device` and stream the others (and, with
    stream_face_blocks, the 8 face-adapter blocks) from pinned host memory. Returns the BlockSwap;
    `.remove()` undoes it."""
    n = len(model.blocks)
    if isinstance(resident, bool) or not isinstance(resident, int) or not 0 <= resident <= n:
        raise ValidationError(f"resident blocks must be an integer in [0, {n}], got {resident!r}")
    streamed = set(streamed_block_indices(n, resident))
    chosen = [(name, m) for name, m in dit_units(model, stream_face_blocks)
              if not name.startswith("blocks.") or int(name.split(".")[1]) in streamed]
    return BlockSwap(model, [m for _, m in chosen], device, transport, names=[name for name, _ in chosen])


# ----------------------------------------------------------------------------------------------
# Component placement: what the pipeline calls around T5, CLIP, the VAE (and preprocessing models)


class Placement:
    """Where the pipeline's components are while it runs. This default leaves every component
    where it was built (resident): `use()` does nothing, the VAE is not tiled."""

    vae_tiling: Tiling | None = None
    swap: BlockSwap | None = None

    def use(self, module: nn.Module | None):
        """Context manager: `module` is on the compute device inside the block."""
        return contextlib.nullcontext(module)

    def recover(self) -> None:
        """Return to a clean state after an exception (e.g. out of memory) in the middle of a request."""
        if self.swap is not None:
            self.swap.reset()

    def remove(self) -> None:
        pass

    def describe(self) -> str:
        return "all components resident"


@dataclass
class _Offloaded:
    name: str
    module: nn.Module
    layouts: list[_FlatLayout]
    host_views: list[list[torch.Tensor]]
    host_flats: list[torch.Tensor]
    origin: dict
    arenas: list[torch.Tensor]
    depth: int = 0
    device_flats: list[torch.Tensor] | None = None


class ComponentOffload(Placement):
    """Keeps the given modules in pinned host memory and moves each to `device` only inside
    `with placement.use(module):` (nested uses of one module move it once). Coming back costs no
    copy: the host bytes are kept and the device copy is simply dropped. Modules not given here are
    left where they are. `swap`, `vae_tiling`: carried for the pipeline (see apply_plan)."""

    def __init__(self, modules: dict[str, nn.Module], device: torch.device | str, *,
                 vae_tiling: Tiling | None = None, swap: BlockSwap | None = None):
        self.device = torch.device(device)
        self.vae_tiling, self.swap = vae_tiling, swap
        self._entries: dict[int, _Offloaded] = {}
        pin = self.device.type == "cuda"
        with torch.no_grad(), torch.inference_mode(False):
            for name, module in modules.items():
                if module is None or id(module) in self._entries:
                    continue
                origin = {(id(o), n): t.device for o, n, _, t in _owned_tensors(module)}
                layouts = _FlatLayout.parts(module, name)
                arenas, flats, views = _pack_to_host(layouts, pin)
                self._entries[id(module)] = _Offloaded(name, module, layouts, views, flats, origin, arenas)

    @property
    def offloaded(self) -> list[str]:
        return [e.name for e in self._entries.values()]

    def host_bytes(self) -> int:
        return sum(lay.nbytes for e in self._entries.values() for lay in e.layouts)

    @contextlib.contextmanager
    def use(self, module: nn.Module | None):
        entry = self._entries.get(id(module)) if module is not None else None
        if entry is None:
            yield module
            return
        if entry.depth == 0:
            self._load(entry)
        entry.depth += 1
        try:
            yield module
        finally:
            entry.depth -= 1
            if entry.depth == 0:
                self._unload(entry)

    def _load(self, entry: _Offloaded) -> None:
        flats = []
        with torch.no_grad(), torch.inference_mode(False):
            for lay, host in zip(entry.layouts, entry.host_flats):
                # One copy per part, on the compute stream: whatever runs next is ordered after it.
                flat = torch.empty(lay.nbytes, dtype=torch.uint8, device=self.device)
                flat.copy_(host, non_blocking=host.is_pinned())
                lay.bind(lay.views(flat))
                flats.append(flat)
        entry.device_flats = flats

    def _unload(self, entry: _Offloaded) -> None:
        for lay, views in zip(entry.layouts, entry.host_views):
            lay.bind(views)
        entry.device_flats = None          # freed in stream order: work already queued still reads it

    def recover(self) -> None:
        for entry in self._entries.values():
            if entry.depth:
                entry.depth = 0
                self._unload(entry)
        super().recover()

    def remove(self) -> None:
        """Put every offloaded module back on the device it was on before, then remove the swap."""
        self.recover()
        with torch.no_grad(), torch.inference_mode(False):
            for entry in self._entries.values():
                for lay, views in zip(entry.layouts, entry.host_views):
                    lay.bind([v.to(entry.origin[(id(e.module), e.name)], copy=True)
                              for e, v in zip(lay.entries, views)])
        self._entries.clear()
        if self.swap is not None:
            self.swap.remove()
            self.swap = None

    def describe(self) -> str:
        parts = [f"offloaded to pinned host memory: {', '.join(self.offloaded)}" if self._entries else
                 "components resident"]
        if self.swap is not None:
            total = len(self.swap.model.blocks)
            blocks = sum(1 for n in self.swap.names if n.startswith("blocks."))
            face = len(self.swap.names) - blocks
            parts.append(f"DiT blocks resident {total - blocks}/{total}" + (f", {face} face blocks streamed" if face else ""))
        if self.vae_tiling is not None:
            parts.append(f"VAE tiled ({self.vae_tiling.size}/{self.vae_tiling.overlap} latent px)")
        return "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# Out of memory at run time


def release_memory(device: torch.device, placement: Placement | None = None) -> None:
    """After an out-of-memory error, once the exception (and with it the failed request's frames)
    is gone: collect reference cycles, reset the placement (bindings, modules moved in for a
    call), and hand cached blocks back to the driver so the next request starts clean."""
    gc.collect()
    if placement is not None:
        placement.recover()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def oom_message(failure: str | None, stage: str, size: tuple[int, int], options, placement: Placement | None) -> str:
    """What ResourceExhausted says after an out-of-memory error: where, at what size, what to change."""
    h, w = size
    guided = getattr(options, "guide_scale", 1.0) > 1
    batch_cfg = guided and getattr(options, "batch_cfg", False)
    clip_len = getattr(options, "clip_len", 77)
    head = (f"out of device memory during {stage} at {w}x{h}, {clip_len}-frame segments"
            + (", both guidance passes in one batch" if batch_cfg else "")
            + (f" ({failure})" if failure else "") + ".")
    fixes = []
    if placement is None or (placement.swap is None and not isinstance(placement, ComponentOffload)):
        fixes.append("pass --vram-budget with your GPU's memory (e.g. --vram-budget 24GB): the planner then "
                     "streams DiT blocks from host memory and offloads T5, CLIP and the VAE")
    else:
        fixes.append(f"the VRAM plan ({placement.describe()}) left too little room: pass a lower --vram-budget "
                     "(other processes may be using the GPU)")
    if h * w > 480 * 832:
        fixes.append("a smaller --size (832x480 needs about a quarter of 1280x720's activation memory)")
    fixes.append("--quant fp8 (halves the DiT weights)")
    if batch_cfg:
        fixes.append("batch_cfg=False (runs the two guidance passes one after the other: half the DiT activations)")
    if clip_len > 41:
        fixes.append("a shorter --clip-len such as 41 (fewer tokens per DiT step)")
    return head + " To fit, try: " + "; ".join(fixes) + ". The engine is still healthy and can take the next request."
