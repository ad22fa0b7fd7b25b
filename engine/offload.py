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
from dataclasses import dataclass
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
    case-insensitive); a bare number means GB. An int passes through as bytes.

    The budget is what PyTorch's allocator may hold. A "24 GB" card has 24 GiB, of which the CUDA
    context takes 0.5-1 GiB, so --vram-budget 24GB (22.4 GiB) fits it with room to spare."""
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
        self.pipeline = None                  # set by apply_plan: remove() restores its default placement
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
        if getattr(self.pipeline, "placement", None) is self:
            self.pipeline.placement = Placement()

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


# ----------------------------------------------------------------------------------------------
# What each component weighs (counted on meta-built modules, so exact for any config)


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)
        if name not in ("bfloat16", "float16", "float32"):
            raise ValidationError(f"dtype must be bf16, fp16 or fp32, got {dtype!r}")
        return name
    return str(dtype).replace("torch.", "")


def quant_available() -> bool:
    """Whether wanimate.quant (written on another branch) provides the module swaps."""
    try:
        from ..quant import QuantConfig, convert_for_runtime  # noqa: F401  (the API this module uses)
    except ImportError:
        return False
    return True


def _bytes(module: nn.Module, float_dtype: torch.dtype | None = None) -> int:
    """Parameter + buffer bytes; floating tensors counted at float_dtype when given (the model is
    built in fp32 on meta and cast at load time), others (fp8/int8 storage, scales) as they are."""
    total = 0
    for _, _, _, t in _owned_tensors(module):
        size = t.element_size()
        if float_dtype is not None and t.dtype == torch.float32:
            size = torch.empty((), dtype=float_dtype).element_size()
        total += t.numel() * size
    return total


@dataclass(frozen=True)
class ComponentSizes:
    """Bytes of weights per component, as loaded (DiT in the compute dtype or quantized, T5 in the
    compute dtype, CLIP fp16, VAE fp32: engine/components.py)."""
    dit_base: int                 # everything of the DiT outside its blocks and face blocks
    block: int                    # one transformer block (they are all the same size)
    num_blocks: int
    face_block: int
    num_face_blocks: int
    text_encoder: int
    clip: int
    vae: int
    source: str = "parameter bytes of meta-built modules"

    @property
    def dit(self) -> int:
        return self.dit_base + self.block * self.num_blocks + self.face_block * self.num_face_blocks

    def component(self, name: str) -> int:
        return {"text_encoder": self.text_encoder, "clip": self.clip, "vae": self.vae}[name]


def component_sizes(config: ModelConfig, dtype: torch.dtype | str = torch.bfloat16,
                    quant: str | None = None) -> ComponentSizes:
    from .clip import CLIPVisual
    from .loader import build_dit
    from .text import T5Encoder
    from .vae import WanVAE

    compute = getattr(torch, _dtype_name(dtype))
    dit = build_dit(config.dit)
    if quant is not None:
        if not quant_available():
            raise ValidationError(f"--quant {quant} needs wanimate.quant, which this installation does not have")
        from ..quant import QuantConfig, convert_for_runtime
        convert_for_runtime(dit, QuantConfig(quant), device="meta")
    block = max(_bytes(b, compute) for b in dit.blocks)
    faces = list(dit.face_adapter.fuser_blocks)
    face = max((_bytes(f, compute) for f in faces), default=0)
    base = _bytes(dit, compute) - sum(_bytes(b, compute) for b in dit.blocks) - sum(_bytes(f, compute) for f in faces)
    with torch.device("meta"):
        t5, clip, vae = T5Encoder(config.t5), CLIPVisual(config.clip), WanVAE(config.vae)
    small = compute if compute == torch.float32 else torch.float16     # CLIP runs in fp16 officially
    return ComponentSizes(base, block, len(dit.blocks), face, len(faces), _bytes(t5, compute), _bytes(clip, small),
                          _bytes(vae, torch.float32))


# ----------------------------------------------------------------------------------------------
# Transient memory: the memory model


@dataclass(frozen=True)
class MemoryModel:
    """Peak transient bytes of each phase, beyond the weights.

    Defaults: measured by bench/vram_matrix.py on an NVIDIA H200 (torch 2.11, 2026-11-22,
    bench/results/vram_matrix_h200.json; torch.cuda.max_memory_allocated over each phase):
      DiT denoise(), per token per model dim per batch element: bf16 28.0 B (same as the
        live-tensor trace of `python -m wanimate.bench.memtrace`; peak inside apply_rope); fp32 33.6 B
        (trace only).
      VAE decode step (fp32), per output pixel: 30288 B untiled (the trace said 25110); tiled 38684 B
        (worse than untiled on the GPU: every tile keeps its own cache and the blend buffers add up),
        independent of the frame count (77 and 385 frames: the same peak).
      VAE encode (fp32), per input pixel: 19502 B untiled (trace 15650), tiled from the trace.
      T5 and CLIP transient activations as measured.
    `overhead` covers the caching allocator's rounding and fragmentation on transient peaks: the
    measured 1.485 is the largest ratio of reserved to allocated memory over the matrix's phases
    (an FP8 480p plan at the trace's 1.10 ran out of memory in the VAE decode and at 24 GB).
    `from_json` loads a MemoryModel measured on another GPU."""

    dit_act_per_token_dim: tuple[tuple[str, float], ...] = (("bfloat16", 28.0), ("float16", 28.0), ("float32", 33.6))
    vae_decode_per_px: float = 30288.0
    vae_decode_tiled_per_px: float = 38684.0
    vae_encode_per_px: float = 19502.0
    vae_encode_tiled_per_px: float = 12720.0
    t5_act: float = 446710784.0
    clip_act: float = 7538176.0
    overhead: float = 1.485
    # A bf16 VAE's transients relative to the fp32 ones: 17.2 KB/px decode peak at 480p and 720p in
    # bench/results/vae_h200.json (6.83 / 15.14 GiB) against the fp32 30.3 KB/px above.
    vae_bf16_ratio: float = 0.57
    source: str = "bench/vram_matrix.py on NVIDIA H200, 2026-11-22 (DiT bf16 and VAE measured; fp32 DiT traced)"

    def dit_act(self, dtype: str) -> float:
        return dict(self.dit_act_per_token_dim).get(dtype, max(v for _, v in self.dit_act_per_token_dim))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict | str | Path) -> "MemoryModel":
        if not isinstance(data, dict):
            data = json.loads(Path(data).read_text())
        data = data.get("memory_model", data)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "dit_act_per_token_dim" in kwargs:
            value = kwargs["dit_act_per_token_dim"]
            kwargs["dit_act_per_token_dim"] = tuple((k, float(v)) for k, v in
                                                    (value.items() if isinstance(value, dict) else value))
        return cls(**kwargs)


RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}


def parse_resolution(resolution: str | tuple[int, int]) -> tuple[int, int]:
    """'480p' | '720p' | 'WxH' (e.g. '832x480') | (height, width) -> (height, width)."""
    if isinstance(resolution, tuple):
        h, w = resolution
    elif isinstance(resolution, str) and resolution.lower() in RESOLUTIONS:
        return RESOLUTIONS[resolution.lower()]
    else:
        m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", str(resolution))
        if not m:
            raise ValidationError(f"resolution must be 480p, 720p or WxH such as 832x480, got {resolution!r}")
        w, h = int(m[1]), int(m[2])
    if h <= 0 or w <= 0 or h % 16 or w % 16:
        raise ValidationError(f"resolution {w}x{h}: width and height must be positive multiples of 16")
    return h, w


def dit_tokens(cfg: DiTConfig, size: tuple[int, int], frames: int) -> int:
    """Tokens of one DiT forward: (latent frames + the reference frame) x (H/16) x (W/16)."""
    h, w = size
    pt, ph, pw = cfg.patch_size
    return ((frames - 1) // 4 + 2) // pt * (h // 8 // ph) * (w // 8 // pw)


# ----------------------------------------------------------------------------------------------
# The plan


OFFLOADABLE = ("text_encoder", "clip", "vae")


@dataclass(frozen=True)
class VRAMPlan:
    budget_bytes: int
    size: tuple[int, int]                        # (height, width)
    frames: int
    dtype: str
    quant: str | None
    batch: int
    num_blocks: int
    resident_blocks: int
    stream_face_blocks: bool
    offload: tuple[str, ...]
    vae_tiling: Tiling | None
    phases: dict                                 # estimated peak bytes per phase
    headroom: int
    vae_dtype: str = "float32"                   # "bfloat16" only when the official fp32 VAE cannot fit
    t5_on_cpu: bool = False                      # the official --t5_cpu: T5 runs on the host, once per request

    @property
    def peak_bytes(self) -> int:
        return max(self.phases.values())

    @property
    def streams_blocks(self) -> bool:
        return self.resident_blocks < self.num_blocks or self.stream_face_blocks

    def summary(self) -> str:
        h, w = self.size
        parts = [f"{_gb(self.budget_bytes)} budget at {w}x{h}, {self.frames} frames, {self.dtype}"
                 + (f" + {self.quant}" if self.quant else ""),
                 f"DiT blocks resident {self.resident_blocks}/{self.num_blocks}"
                 + (", face blocks streamed" if self.stream_face_blocks else ""),
                 "offloaded: " + (", ".join(self.offload) if self.offload else "nothing")]
        if self.vae_tiling is not None:
            parts.append(f"VAE tiled {self.vae_tiling.size}/{self.vae_tiling.overlap}")
        if self.t5_on_cpu:
            parts.append("T5 on the CPU (--t5_cpu)")
        if self.vae_dtype != "float32":
            parts.append(f"VAE in {self.vae_dtype} (the official fp32 VAE does not fit; decode rel L2 ~1.5e-2)")
        top = max(self.phases, key=self.phases.get)
        parts.append(f"estimated peak {_gb(self.peak_bytes)} ({top})")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["vae_tiling"] = dataclasses.asdict(self.vae_tiling) if self.vae_tiling else None
        d["peak_bytes"] = self.peak_bytes
        return d


def headroom(budget_bytes: int) -> int:
    """Kept free under the budget for what the model does not count (cuBLAS workspaces, small
    per-request tensors, allocator slack)."""
    return int(max(0.5 * GiB, 0.03 * budget_bytes))


def estimate_phases(sizes: ComponentSizes, mem: MemoryModel, cfg: ModelConfig, size: tuple[int, int], frames: int,
                    dtype: str, batch: int, resident: int, stream_face: bool, offload: Sequence[str],
                    tiling: Tiling | None, vae_bf16: bool = False, t5_on_cpu: bool = False) -> dict[str, int]:
    """Peak bytes of each phase of a request: the resident weights plus that phase's transients."""
    if vae_bf16:
        sizes = dataclasses.replace(sizes, vae=sizes.vae // 2)
    if t5_on_cpu:
        sizes = dataclasses.replace(sizes, text_encoder=0)
    h, w = size
    px = h * w
    d = cfg.dit
    elt = 4 if dtype == "float32" else 2
    streamed = sizes.num_blocks - resident
    slots = 2 * max(sizes.block if streamed else 0, sizes.face_block if stream_face else 0)
    if streamed == 1 and not stream_face:
        slots = sizes.block
    weights = (sizes.dit_base + resident * sizes.block + (0 if stream_face else sizes.face_block * sizes.num_face_blocks)
               + slots + sum(sizes.component(c) for c in OFFLOADABLE if c not in offload))
    on_call = {c: (sizes.component(c) if c in offload else 0) for c in OFFLOADABLE}
    # Held through a segment: pose and face pixel batches in the compute dtype, the request's context tokens.
    segment = frames * 3 * elt * (px + d.motion_size ** 2) + 2 * (d.text_len + d.image_tokens) * d.dim * elt
    tokens = dit_tokens(d, size, frames)
    cond = batch * (d.num_layers * 2 * (d.text_len + d.image_tokens) * d.dim * elt   # cross-attention K/V
                    + tokens * d.dim * elt                                              # pose tokens
                    + tokens * d.head_dim * 4)                                          # RoPE cos/sin
    dit_act = mem.dit_act(dtype) * tokens * d.dim * batch
    vae_scale = mem.vae_bf16_ratio if vae_bf16 else 1.0
    enc = vae_scale * (mem.vae_encode_tiled_per_px if tiling else mem.vae_encode_per_px) * px + frames * px * 3 * 4
    dec = vae_scale * (mem.vae_decode_tiled_per_px if tiling else mem.vae_decode_per_px) * px
    o = mem.overhead
    return {
        "text encoder": int(weights + (0 if t5_on_cpu else on_call["text_encoder"] + o * mem.t5_act)),
        "reference (CLIP)": int(weights + on_call["clip"] + o * mem.clip_act),
        "VAE encode": int(weights + segment + on_call["vae"] + o * enc),
        "DiT step": int(weights + segment + cond + o * dit_act),
        "VAE decode": int(weights + segment + on_call["vae"] + o * dec),
    }


def plan_vram(budget_bytes: int | str, config: ModelConfig, resolution: str | tuple[int, int], frames: int = 77,
              dtype: torch.dtype | str = torch.bfloat16, quant: str | None = None, *, batch: int = 1,
              memory: MemoryModel | None = None, sizes: ComponentSizes | None = None) -> VRAMPlan:
    """Choose how to run within `budget_bytes` of device memory: how many DiT blocks stay resident,
    which components are offloaded, whether the VAE is tiled. Preference: everything resident;
    then offload T5, CLIP, the VAE (cheap: T5 and CLIP run once per request, a VAE move is ~0.5 GB
    per call) keeping as many blocks resident as fit; then stream the face blocks too; then tile
    the VAE (the only step that changes numerics). Raises ResourceExhausted, naming what would
    fit, when nothing does. `batch` is 2 for guidance with both passes in one batch."""
    budget = parse_budget(budget_bytes) if isinstance(budget_bytes, str) else int(budget_bytes)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 5 or (frames - 1) % 4:
        raise ValidationError(f"frames must be 4n+1 (5, 9, ..., 77), got {frames!r}")
    if batch not in (1, 2):
        raise ValidationError(f"batch must be 1 or 2 (guidance in one batch), got {batch!r}")
    dname = _dtype_name(dtype)
    size = parse_resolution(resolution)
    sizes = sizes or component_sizes(config, dname, quant)
    mem = memory or MemoryModel()
    room = headroom(budget)
    usable = budget - room
    n = sizes.num_blocks

    def phases(k, face, offload, tiling):
        return estimate_phases(sizes, mem, config, size, frames, dname, batch, k, face, offload, tiling)

    def most_resident(face, offload, tiling):
        for k in range(n, -1, -1):
            if max(phases(k, face, offload, tiling).values()) <= usable:
                return k
        return None

    def plan(k, face, offload, tiling):
        return VRAMPlan(budget, size, frames, dname, quant, batch, n, k, face, tuple(offload), tiling,
                        phases(k, face, offload, tiling), room)

    best = None
    for i in range(len(OFFLOADABLE) + 1):
        offload = OFFLOADABLE[:i]
        k = most_resident(False, offload, None)
        if k == n:
            return plan(k, False, offload, None)
        if k is not None and (best is None or k > best[0]):
            best = (k, offload)
    if best is not None:
        return plan(best[0], False, best[1], None)
    for tiling in (None, Tiling()):
        k = most_resident(True, OFFLOADABLE, tiling)
        if k is not None:
            return plan(k, True, OFFLOADABLE, tiling)
    # Then the official --t5_cpu (T5 runs on the host once per request: slower, same numerics), and
    # last the one step that leaves the official numerics: the VAE in bf16 (about half the activation
    # memory; decode rel L2 ~1.5e-2 against fp32, tests/test_vae.py).
    for vae_bf16 in (False, True):
        for k in range(n, -1, -1):
            ph = estimate_phases(sizes, mem, config, size, frames, dname, batch, k, True, OFFLOADABLE, None,
                                 vae_bf16=vae_bf16, t5_on_cpu=True)
            if max(ph.values()) <= usable:
                return VRAMPlan(budget, size, frames, dname, quant, batch, n, k, True, tuple(OFFLOADABLE), None, ph,
                                room, vae_dtype="bfloat16" if vae_bf16 else "float32", t5_on_cpu=True)
    raise ResourceExhausted(_no_fit_message(budget, config, size, frames, dname, quant, batch, mem, sizes))


def min_vram(config: ModelConfig, resolution, frames: int = 77, dtype="bf16", quant: str | None = None, *,
             batch: int = 1, memory: MemoryModel | None = None, sizes: ComponentSizes | None = None) -> tuple[int, str]:
    """(bytes of budget needed, the phase that needs it) with everything streamed and offloaded."""
    dname = _dtype_name(dtype)
    size = parse_resolution(resolution)
    sizes = sizes or component_sizes(config, dname, quant)
    # Everything streamed and offloaded; the VAE tiled or not, whichever needs less (on the GPU the
    # tiled decode measured larger: every tile keeps its own cache).
    options = [estimate_phases(sizes, memory or MemoryModel(), config, size, frames, dname, batch, 0, True,
                               OFFLOADABLE, tiling, vae_bf16, True) for tiling in (None, Tiling()) for vae_bf16 in (False, True)]
    ph = min(options, key=lambda p: max(p.values()))
    top = max(ph, key=ph.get)
    need = ph[top]
    budget = need + headroom(need)
    while budget - headroom(budget) < need:          # headroom grows with the budget
        budget += GiB // 8
    return budget, top


def _no_fit_message(budget, config, size, frames, dname, quant, batch, mem, sizes) -> str:
    h, w = size
    need, phase = min_vram(config, size, frames, dname, quant, batch=batch, memory=mem, sizes=sizes)
    name = next((k for k, v in RESOLUTIONS.items() if v == size), f"{w}x{h}")
    what = f"{name} ({w}x{h}), {frames}-frame segments, {dname}" + (f" + {quant}" if quant else "")
    tries = []
    if h * w > RESOLUTIONS["480p"][0] * RESOLUTIONS["480p"][1]:
        n480, _ = min_vram(config, "480p", frames, dname, quant, batch=batch, memory=mem,
                           sizes=sizes)
        tries.append(f"480p (needs {_gb(n480)})")
    if quant is None and quant_available() and dname != "float32":
        try:
            nfp8, _ = min_vram(config, size, frames, dname, "fp8", batch=batch, memory=mem)
            tries.append(f"--quant fp8 (needs {_gb(nfp8)})")
        except (ValidationError, ImportError, TypeError, AttributeError):
            pass                                    # the quantized sizes cannot be built here: no suggestion
    if batch == 2:
        n1, _ = min_vram(config, size, frames, dname, quant, batch=1, memory=mem, sizes=sizes)
        tries.append(f"the two guidance passes one after the other (needs {_gb(n1)})")
    if frames > 41 and phase == "DiT step":
        n41, _ = min_vram(config, size, 41, dname, quant, batch=batch, memory=mem, sizes=sizes)
        tries.append(f"--clip-len 41 (needs {_gb(n41)})")
    tries.append(f"--vram-budget {math.ceil(need / GB)}GB")
    return (f"{_gb(budget)} of VRAM is not enough for {what}: it needs {_gb(need)} even with every DiT block "
            f"streamed from host memory and T5, CLIP and the VAE offloaded (the {phase} is the largest phase). "
            f"Try " + ", or ".join(tries) + ".")


def apply_plan(pipeline, plan: VRAMPlan, *, transport: str | object = "auto") -> ComponentOffload:
    """Apply a plan to a Pipeline whose weights may be anywhere (load them on the CPU for budgets
    below the model's size): stream the DiT's blocks as planned, keep the offloaded components in
    pinned host memory, move everything else to `pipeline.device`, and install the placement the
    pipeline calls around T5/CLIP/VAE. Returns the placement; `.remove()` undoes all of it."""
    device = pipeline.device
    dit = pipeline.dit
    if len(dit.blocks) != plan.num_blocks:
        raise ValidationError(f"the plan is for {plan.num_blocks} DiT blocks, the pipeline has {len(dit.blocks)}")
    swap = None
    if plan.streams_blocks:
        swap = apply_block_swap(dit, plan.resident_blocks, device, stream_face_blocks=plan.stream_face_blocks,
                                transport=transport)
    else:
        dit.to(device)
    if plan.vae_dtype != "float32":
        pipeline.vae.to(getattr(torch, plan.vae_dtype))
    components = {"text_encoder": pipeline.text_encoder, "clip": pipeline.clip, "vae": pipeline.vae}
    for name, module in components.items():
        if module is not None and name not in plan.offload:
            module.to(device)
    if plan.t5_on_cpu and pipeline.text_encoder is not None:
        pipeline.text_encoder.to("cpu")                  # encode_prompts moves the context to the device
        components["text_encoder"] = None
    placement = ComponentOffload({n: components[n] for n in plan.offload if components[n] is not None}, device,
                                 vae_tiling=plan.vae_tiling, swap=swap)
    placement.pipeline = pipeline
    pipeline.placement = placement
    return placement


def pipeline_sizes(pipeline) -> ComponentSizes:
    """ComponentSizes of a loaded pipeline, from its actual tensors (quantized or not)."""
    dit = pipeline.dit
    faces = list(dit.face_adapter.fuser_blocks)
    blocks = [_bytes(b) for b in dit.blocks]
    face = [_bytes(f) for f in faces]
    base = _bytes(dit) - sum(blocks) - sum(face)
    size = lambda m: _bytes(m) if m is not None else 0
    return ComponentSizes(base, max(blocks), len(blocks), max(face, default=0), len(faces), size(pipeline.text_encoder),
                          size(pipeline.clip), size(pipeline.vae), source="tensors of the loaded pipeline")


def apply_budget(pipeline, budget: int | str, size: tuple[int, int], options, *, memory: MemoryModel | None = None,
                 log: Callable[[str], None] | None = None) -> ComponentOffload:
    """The --vram-budget path of `wanimate run`: plan for this request (its size, clip_len and
    guidance batch) from the loaded pipeline's own tensor sizes, then apply the plan. Raises
    ResourceExhausted before any heavy work when the request cannot fit."""
    guided = getattr(options, "guide_scale", 1.0) > 1
    batch = 2 if guided and getattr(options, "batch_cfg", True) else 1
    from .config import T5Config
    config = ModelConfig(name="loaded", dit=pipeline.dit.cfg, vae=pipeline.vae.config,
                         t5=getattr(pipeline.text_encoder, "config", None) or T5Config(), clip=pipeline.clip.config)
    plan = plan_vram(budget, config, size, options.clip_len, pipeline.dtype, None, batch=batch, memory=memory,
                     sizes=pipeline_sizes(pipeline))
    if log is not None:
        log(f"VRAM plan: {plan.summary()}")
    return apply_plan(pipeline, plan)
