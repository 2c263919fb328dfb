"""Averages of sharded parameters: DTensors, as FSDP2's fully_shard and tensor parallelism make them.

Each rank averages the shard it holds: EMA, SWA and WeightEnsemble bind their fused update to every DTensor
parameter's local tensor, so an update moves no data between ranks and costs 1/world of the unsharded one.

FSDP2 and memory (torch 2.13, measured on gloo/CPU): fully_shard gives each parameter a padded flat buffer
(FSDPParam._sharded_param_data) and the DTensor's local tensor is a contiguous narrow() view of it. Optimizer steps
update that memory in place, and forward/backward (all-gather, reshard) leave it where it is: across training
steps both the local tensor object and its address stay the same, on every rank, uneven and empty shards included.
FSDP2 gives a parameter new local memory only when the parameter itself is replaced or converted: lazy_init
re-pads a local tensor that load_state_dict(assign=True) or Module._apply (.to(), .float()) left unpadded, and
assign=True puts a new DTensor in the module. The average therefore binds to `param._local_tensor` itself
(`to_local()` of a DTensor Parameter returns a new view of it on every call, under no_grad too) and, before each update,
looks the parameter up in its module and checks by identity that its local tensor is still the bound one: a few
attribute reads per parameter. When FSDP2 moved it, the fused update is re-bound to the new local tensors (same
shape, dtype and device required), so the average keeps following the model.

Files: `save_sharded(directory)` writes one safetensors file per rank, rank-RRRRR-of-WWWWW.safetensors, holding
the rank's block of each tensor (averaged tensors and copied buffers, by their model names) and, in the
metadata under "pysoup.sharded", a JSON header: the average's kind and counters, and for each tensor its global
shape, the block's offset in it, and the placements and mesh it came from. Blocks are hyper-rectangles of the
global tensor (Shard and Replicate placements), so `load_sharded` can fill any rank's block on any mesh, or the
whole tensor of an unsharded model, from the blocks that overlap it: a save of 2 ranks loads onto 1 or 4 without
gathering whole tensors in memory. `save(path)` of a sharded average gathers the full tensors (DTensor
full_tensor) and rank 0 writes an ordinary safetensors file that pysoup.merge reads.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass

from pysoup.errors import PlanError

SHARD_FILE = "rank-{rank:05d}-of-{world:05d}.safetensors"
_SHARD_FILE_RE = re.compile(r"rank-(\d{5})-of-(\d{5})\.safetensors")
METADATA_KEY = "pysoup.sharded"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TensorLayout:
    """One DTensor's layout: its global shape and stride, mesh and placements."""

    shape: tuple
    stride: tuple
    mesh: object  # torch.distributed.device_mesh.DeviceMesh
    placements: tuple

    def block(self, name: str, kind: str) -> tuple:
        """(offset, shape) of this rank's block of the global tensor. Shard(d) splits a dimension as torch.chunk
        does (DTensor's own rule), mesh dimension after mesh dimension; Replicate keeps it whole."""
        from torch.distributed.tensor import Replicate, Shard

        coordinate = self.mesh.get_coordinate()
        if coordinate is None:
            raise PlanError(f"{kind}: {name!r}: this rank is not in the tensor's device mesh")
        offset, size = [0] * len(self.shape), list(self.shape)
        for n, c, p in zip(self.mesh.shape, coordinate, self.placements):
            if type(p) is Replicate:
                continue
            if type(p) is not Shard:
                raise PlanError(f"{kind}: {name!r} has placement {p}; sharded files hold Shard and Replicate only")
            chunk = -(-size[p.dim] // n)
            start = min(c * chunk, size[p.dim])
            offset[p.dim] += start
            size[p.dim] = min(size[p.dim], start + chunk) - start
        return tuple(offset), tuple(size)

    def is_replica(self) -> bool:
        """Another rank (one with coordinate 0 on each Replicate mesh dimension) holds the same block."""
        from torch.distributed.tensor import Replicate

        coordinate = self.mesh.get_coordinate()
        return any(c != 0 for c, p in zip(coordinate, self.placements) if type(p) is Replicate)


def _dtensor_class():
    """DTensor, or None when torch.distributed.tensor was never imported (then no DTensor can exist)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


class Sharding:
    """The DTensor entries of an average: each one's layout, and the module slot that holds the parameter, so
    that the average finds the parameter's current local tensor when FSDP2 replaced it."""

    def __init__(self, model, named: list, kind: str):
        dtensor = _dtensor_class()
        self.kind = kind
        self.layouts = {}  # name -> TensorLayout
        self._slots = []  # (index in the average's tensors, name, the owning module's parameter/buffer dict, key)
        self._entries = named
        for i, (name, t) in enumerate(named):
            if not isinstance(t, dtensor):
                continue
            owner_name, _, key = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            slots = owner._parameters if key in owner._parameters else owner._buffers
            self._slots.append((i, name, slots, key))
            self.layouts[name] = TensorLayout(tuple(t.shape), tuple(t.stride()), t.device_mesh, tuple(t.placements))
            local = t._local_tensor
            if not local.is_contiguous():
                raise PlanError(f"{kind}: {name!r}: its local shard is not contiguous; it is read in place")

        self._fsdp_modules = fsdp_modules(model)

    def reshard(self) -> None:
        """Reshards every FSDP2 module: after a forward without backward (evaluation), FSDP2 keeps the root
        module's parameters all-gathered, and the next forward would use those copies instead of the shards."""
        for module in self._fsdp_modules:
            module.reshard()

    @classmethod
    def of(cls, model, named: list, kind: str):
        """A Sharding of the model's tensors, or None when none is a DTensor."""
        dtensor = _dtensor_class()
        if dtensor is None or not any(isinstance(t, dtensor) for _, t in named):
            return None
        return cls(model, named, kind)

    def local_tensors(self) -> list:
        """The tensors the update reads: each DTensor's local shard (the object itself), other tensors as they are."""
        dtensor = _dtensor_class()
        return [t._local_tensor if isinstance(t, dtensor) else t for _, t in self._entries]

    def rebind_if_moved(self, average) -> None:
        """Re-binds the average's update when a DTensor parameter's local tensor is no longer the bound one."""
        bound = average._current
        if all(getattr(slots.get(key), "_local_tensor", None) is bound[i] for i, _, slots, key in self._slots):
            return
        dtensor = _dtensor_class()
        fresh = list(bound)
        for i, name, slots, key in self._slots:
            p = slots.get(key)
            if not isinstance(p, dtensor) or p._local_tensor is bound[i]:
                # Not a DTensor: FSDP2 holds the module unsharded (the root after a forward without backward);
                # the shard it will return to is the one bound, which optimizer steps update in place.
                continue
            layout = self.layouts[name]
            if tuple(p.shape) != layout.shape or tuple(p.placements) != layout.placements:
                raise PlanError(
                    f"{name!r} changed its layout since the average was made ({list(layout.shape)} "
                    f"{layout.placements} -> {list(p.shape)} {tuple(p.placements)})"
                )
            local, (shape, dtype, device) = p._local_tensor, average._shapes[i]
            if local.shape != shape or local.dtype != dtype or local.device != device or not local.is_contiguous():
                raise PlanError(
                    f"{name!r}'s local shard changed since the average was made ({list(shape)} {dtype} on {device} "
                    f"-> {list(local.shape)} {local.dtype} on {local.device})"
                )
            fresh[i] = local
        if any(a is not b for a, b in zip(fresh, bound)):
            average._bind(fresh)


def fsdp_modules(model) -> list:
    """The FSDP2 modules (fully_shard) in `model`, outermost first."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    kind = getattr(fsdp, "FSDPModule", None)
    return [] if kind is None else [m for m in model.modules() if isinstance(m, kind)]


# -- collectives -----------------------------------------------------------------------------------------------
def _rank_and_world() -> tuple:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _raise_if_any_failed(error, what: str) -> None:
    """Every rank learns whether every rank succeeded (the exchange is also a barrier): the rank that failed
    raises its own error, the others a PlanError naming the first failed rank."""
    import torch.distributed as dist

    rank, world = _rank_and_world()
    if world > 1:
        reports = [None] * world
        dist.all_gather_object(reports, None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, why) for r, why in enumerate(reports) if why is not None]
        if failed and error is None:
            raise PlanError(f"{what}: rank {failed[0][0]} failed ({failed[0][1]})")
    if error is not None:
        raise error


# -- saving ------------------------------------------------------------------------------------------------------
def save_full(average, path, shard_size=None) -> list:
    """Gathers a sharded average's full tensors and writes them on rank 0 as save() does for an unsharded one.
    Every rank calls it; returns the paths written on rank 0, [] on the others.

    Example:
        >>> ema.save("ema.safetensors")   # on every rank; DTensor.full_tensor() per tensor   # doctest: +SKIP
    """
    from torch.distributed.tensor import DTensor

    from pysoup.io.writer import write_arrays
    from pysoup.training.average import host_arrays

    rank, _ = _rank_and_world()
    layouts = average._sharding.layouts if average._sharding is not None else {}
    full = {}
    for name, t in average.state_dict_of_average().items():
        layout = layouts.get(name)
        if layout is not None:  # every rank takes part in each gather
            t = DTensor.from_local(
                t, layout.mesh, layout.placements, run_check=False, shape=layout.shape, stride=layout.stride
            ).full_tensor()
        if rank == 0:
            full[name] = t.cpu()
    paths, error = [], None
    if rank == 0:
        try:
            arrays, dtypes = host_arrays(full)
            paths = write_arrays(path, arrays, dtypes, shard_size=shard_size, metadata={"format": "pt"})
        except Exception as exc:  # every rank must hear of it, or they would wait forever
            error = exc
    _raise_if_any_failed(error, f"{average.kind}.save")
    return paths


def save_sharded(average, directory) -> list:
    """Writes this rank's blocks of the average, with the counters, to `directory`/rank-RRRRR-of-WWWWW.safetensors.

    A sharded average is saved by every rank of the default process group (each writes its own file; the call
    returns once all have written, and raises on every rank if one failed); rank 0 first removes files of an
    earlier save with another world size. An unsharded average is the same on every rank: whoever calls writes
    rank-00000-of-00001.safetensors (e.g. only rank 0), with no collective.

    Args:
        average: an EMA, SWA or WeightEnsemble.
        directory: created if missing.

    Returns:
        [the file written].

    Example:
        >>> ema.save_sharded("ckpt/ema")      # every rank of an FSDP2 job   # doctest: +SKIP
        >>> ema.load_sharded("ckpt/ema")      # any world size                # doctest: +SKIP
    """
    from pysoup.io.writer import write_arrays
    from pysoup.training.average import host_arrays

    sharding = average._sharding
    rank, world = _rank_and_world() if sharding is not None else (0, 1)
    directory = os.fspath(directory)
    paths, error = [], None
    try:
        os.makedirs(directory, exist_ok=True)
        if rank == 0:
            _remove_other_saves(directory, world)
        tensors, entries = {}, {}
        for part in ("averaged", "copied"):
            for name, t in getattr(average, part).items():
                layout = sharding.layouts.get(name) if sharding is not None else None
                if layout is None:
                    offset, entry = (0,) * t.dim(), {"part": part, "shape": list(t.shape)}
                else:
                    offset, shape = layout.block(name, average.kind)
                    if shape != tuple(t.shape):
                        raise PlanError(
                            f"{average.kind}: {name!r}: local shard {list(t.shape)}, expected {list(shape)}"
                        )
                    if layout.is_replica() or t.numel() == 0:
                        continue  # another rank writes the same block; an empty one adds nothing
                    entry = {
                        "part": part,
                        "shape": list(layout.shape),
                        "placements": [repr(p) for p in layout.placements],
                        "mesh": list(layout.mesh.shape),
                    }
                entries[name] = {**entry, "offset": list(offset)}
                tensors[name] = t
        header = {
            "version": FORMAT_VERSION,
            "kind": average.kind,
            "counters": average._counters(),
            "rank": rank,
            "world_size": world,
            "tensors": entries,
        }
        arrays, dtypes = host_arrays(tensors)
        path = os.path.join(directory, SHARD_FILE.format(rank=rank, world=world))
        paths = write_arrays(path, arrays, dtypes, metadata={"format": "pt", METADATA_KEY: json.dumps(header)})
    except Exception as exc:
        error = exc
    if sharding is not None:
        _raise_if_any_failed(error, f"{average.kind}.save_sharded")
    elif error is not None:
        raise error
    return paths


def _remove_other_saves(directory: str, world: int) -> None:
    for name in os.listdir(directory):
        m = _SHARD_FILE_RE.fullmatch(name)
        if m and int(m[2]) != world:
            os.unlink(os.path.join(directory, name))


# -- loading -----------------------------------------------------------------------------------------------------
def shard_files(directory) -> list:
    """The files of the save in `directory`, in rank order; PlanError if there is none, a rank is missing, or
    files of saves with different world sizes lie together."""
    directory = os.fspath(directory)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        raise PlanError(f"{directory}: no such directory") from None
    except NotADirectoryError:
        raise PlanError(f"{directory}: not a directory (save_sharded writes one)") from None
    saves = {}  # world size -> {rank: path}
    for name in names:
        m = _SHARD_FILE_RE.fullmatch(name)
        if m:
            saves.setdefault(int(m[2]), {})[int(m[1])] = os.path.join(directory, name)
    if not saves:
        raise PlanError(f"{directory}: no rank-RRRRR-of-WWWWW.safetensors files")
    if len(saves) > 1:
        raise PlanError(f"{directory}: files of saves by {' and '.join(map(str, sorted(saves)))} ranks lie together")
    [(world, files)] = saves.items()
    stray = [files[r] for r in files if r >= world]
    if stray:
        raise PlanError(f"{stray[0]}: a rank beyond the world size in its name")
    missing = [r for r in range(world) if r not in files]
    if missing:
        raise PlanError(f"{directory}: {SHARD_FILE.format(rank=missing[0], world=world)} is missing")
    return [files[r] for r in range(world)]


def load_sharded(average, directory) -> None:
    """Restores an average (tensors and counters) from a save_sharded() directory, onto this rank's layout.

    Each of this rank's blocks (a DTensor's local shard, or an unsharded tensor whole) is filled from the saved
    blocks that overlap it, so the save may come from any world size or mesh. Everything is checked (kind, names,
    global shapes, dtypes, full coverage, one set of counters) before anything is written. No collective: each
    rank reads what it needs.

    Example:
        >>> ema = pysoup.training.EMA(model)             # model on 1 rank, or sharded    # doctest: +SKIP
        >>> ema.load_sharded("ckpt/ema")                 # saved by 2 ranks               # doctest: +SKIP
    """
    import torch

    from pysoup.dtypes import from_torch
    from pysoup.io.reader import SafetensorsReader

    kind = average.kind
    files = shard_files(directory)
    readers = []
    try:
        for path in files:
            readers.append(SafetensorsReader(path))
        headers = [_header(r, kind) for r in readers]
        counters = headers[0]["counters"]
        for path, header in zip(files, headers):
            if header["counters"] != counters:
                raise PlanError(
                    f"{kind}: {path}: counters {header['counters']} differ from rank 0's {counters} "
                    "(files of different saves?)"
                )
        blocks = {}  # name -> [(offset, shape, reader, part)], identical blocks once
        for reader, header in zip(readers, headers):
            for name, entry in header["tensors"].items():
                block = (tuple(entry["offset"]), tuple(reader.infos[name].shape))
                known = blocks.setdefault(name, [])
                if all(b[:2] != block for b in known):
                    known.append((*block, reader, entry))
        mine = {name: part for part in ("averaged", "copied") for name in getattr(average, part)}
        unknown = sorted(set(blocks) - set(mine))
        if unknown:
            raise PlanError(f"{kind}: {directory}: {unknown[0]!r} is saved but not in this model's average")
        layouts = average._sharding.layouts if average._sharding is not None else {}
        copies = []  # (target, target slices, reader, name, source slices)
        for name, part in mine.items():
            target = getattr(average, part)[name]
            layout = layouts.get(name)
            shape = layout.shape if layout is not None else tuple(target.shape)
            offset = layout.block(name, kind)[0] if layout is not None else (0,) * target.dim()
            covered = 0
            for b_offset, b_shape, reader, entry in blocks.get(name, []):
                where = f"{kind}: {reader.path}: {name!r}"
                if tuple(entry["shape"]) != shape:
                    raise PlanError(f"{where} is {entry['shape']} in the save, {list(shape)} here")
                if entry["part"] != part:
                    raise PlanError(f"{where} is {entry['part']} in the save, {part} here (buffers= differs?)")
                if reader.infos[name].dtype != from_torch(target.dtype):
                    raise PlanError(f"{where} is {reader.infos[name].dtype} in the save, {target.dtype} here")
                overlap = _overlap(offset, tuple(target.shape), b_offset, b_shape)
                if overlap is not None:
                    mine_slices, theirs_slices, count = overlap
                    covered += count
                    copies.append((target, mine_slices, reader, name, theirs_slices))
            if covered != target.numel():
                raise PlanError(
                    f"{kind}: {directory}: the saved blocks cover {covered} of this rank's {target.numel()} "
                    f"elements of {name!r}" + ("" if blocks.get(name) else " (not saved)")
                )
        with torch.no_grad():
            for target, mine_slices, reader, name, theirs_slices in copies:
                target[mine_slices].copy_(reader.torch(name)[theirs_slices])
        for key in average._counters():
            setattr(average, key, counters[key])
    finally:
        for r in readers:
            r.close()


def _header(reader, kind: str) -> dict:
    text = (reader.metadata or {}).get(METADATA_KEY)
    if text is None:
        raise PlanError(f"{kind}: {reader.path}: no {METADATA_KEY!r} metadata (not written by save_sharded)")
    try:
        header = json.loads(text)
    except ValueError as exc:
        raise PlanError(f"{kind}: {reader.path}: bad {METADATA_KEY!r} metadata ({exc})") from None
    if header.get("version") != FORMAT_VERSION:
        raise PlanError(f"{kind}: {reader.path}: format version {header.get('version')!r}, this reads {FORMAT_VERSION}")
    if header.get("kind") != kind:
        raise PlanError(f"{kind}: {reader.path}: the save is of a {header.get('kind')!r}, not a {kind}")
    return header


def _overlap(a_offset, a_shape, b_offset, b_shape):
    """Where block b meets block a: (slices into a, slices into b, element count), or None."""
    mine, theirs, count = [], [], 1
    for ao, an, bo, bn in zip(a_offset, a_shape, b_offset, b_shape):
        lo, hi = max(ao, bo), min(ao + an, bo + bn)
        if lo >= hi:
            return None
        mine.append(slice(lo - ao, hi - ao))
        theirs.append(slice(lo - bo, hi - bo))
        count *= hi - lo
    return tuple(mine), tuple(theirs), count
