"""The server-optimizer step of FedOpt and FedAvgM: per element, the clients' weighted mean update, then the
optimizer's state update and the new global model.

Each element has several outputs (the new x, and m, v or the momentum), so this is not one engine merge: it walks
the tensors, each in chunks of CHUNK_ELEMENTS, reads every input through its checkpoint's sliding window (zero copy;
the engine's readers, so resident memory stays a few windows), runs the op table's fused weighted sum (the numerical
contract) for the clients' mean and numpy's fp32 elementwise ops for the rule, and writes each output through its
own OutputTarget. The files are renamed into place together, only when every one of them is written: a failure
leaves the old model and the old optimizer state as they were.

numpy, not torch, runs the rule: its fp32 add, multiply, divide and sqrt are correctly rounded like torch's (the
tests compare with torch bit for bit), a server stepping files never imports torch (220 MiB of resident memory),
and no second OpenMP runtime spins beside the kernels' (with torch's, the step of 8 bf16 clients of 512 MiB took
60 s instead of 28 s on 2 busy cores unless OMP_WAIT_POLICY=PASSIVE).
"""

from __future__ import annotations

import ctypes
import math

from pysoup.dtypes import SAFETENSORS_SIZES, f32_sum, to_f32, to_torch
from pysoup.errors import PlanError
from pysoup.federated.updates import FLOAT_DTYPES, nonfinite_error
from pysoup.io.checkpoint import open_checkpoint
from pysoup.io.signals import cleanup_on_termination, deferred_termination
from pysoup.io.writer import FileSink, OutputTarget
from pysoup.ops.table import Chunk

# 1 Mi elements: each fp32 temporary of the rule is 4 MiB (a step makes about ten), and an input's span fits the
# 4 MiB windows the aggregators open checkpoints with here.
CHUNK_ELEMENTS = 1 << 20
STEP_WINDOW_BYTES = 4 << 20
# Two buffers of this size per output file.
OUTPUT_BUFFER_BYTES = 4 << 20
_NUMPY = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}  # bf16 as its bits


def optimizer_step(
    global_ckpt,
    clients: list,
    weights: list,
    kind: str,
    rule,
    state_in: dict,
    *,
    out=None,
    state_out: dict,
    metadata: dict,
    threads=None,
    durable=False,
):
    """One server step over already opened and checked checkpoints.

    Args:
        global_ckpt, clients: the round's checkpoints (clients send weights or deltas, `kind`).
        weights: one weight per client (rounded to fp32); the mean update is the fused weighted sum of the clients
            divided by the fp32 sum of the weights, in fp32, minus x when clients send weights.
        rule: rule(x, delta, state) -> (new x, {state name: new value}), on fp32 numpy chunks; `rule.states` names
            the state tensors it keeps (state values are None in the first round).
        state_in: {state name: None, a dict of fp32 torch tensors, or a safetensors path}.
        out: None for a dict of torch tensors, else a .safetensors path or a directory for the new global model.
        state_out: {state name: None (a dict of torch tensors) or a .safetensors path}.
        metadata: the __metadata__ of the state files.
        threads: CPU threads of the weighted-sum kernel.

    Returns:
        (the new global model: a dict or out's paths, {state name: a dict of fp32 tensors or the file's path}).
    """
    import numpy as np

    from pysoup.ops import get_backend
    from pysoup.ops.cpu import default_threads

    backend = get_backend("auto", None, int(threads) if threads else default_threads())
    states = tuple(rule.states)
    floats = [n for n in global_ckpt.infos if global_ckpt.infos[n].dtype in FLOAT_DTYPES]
    x_entries = [(n, i.dtype, i.shape) for n, i in global_ckpt.infos.items()]
    s_entries = [(n, "F32", global_ckpt.infos[n].shape) for n in floats]
    copy_from = clients[0] if kind == "weights" else global_ckpt  # integer buffers
    w32 = [to_f32(float(w)) for w in weights]
    if not f32_sum(w32) > 0 or not math.isfinite(f32_sum(w32)):
        raise PlanError(f"the client weights {list(weights)} sum to {f32_sum(w32)} in float32: cannot average")
    mean = np.empty(CHUNK_ELEMENTS, dtype=np.float32)  # the kernel's output, reused chunk after chunk
    opened, outputs = [], []
    with cleanup_on_termination():
        try:
            state_ckpts = {}
            for s in states:
                if state_in.get(s) is not None:
                    state_ckpts[s] = open_checkpoint(state_in[s], 0, STEP_WINDOW_BYTES)
                    opened.append(state_ckpts[s])
                    where = state_in[s] if isinstance(state_in[s], str) else "in memory"
                    state_ckpts[s].name = f"optimizer state {s!r} ({where})"
                    _check_state(state_ckpts[s], s, s_entries)
            protect = [f for c in clients for f in c.files]
            x_out = _output(out, x_entries, {"format": "pt"}, protect, global_ckpt.aux_files(), durable)
            outputs.append(x_out)
            s_outs = {}
            for s in states:
                s_outs[s] = _output(state_out.get(s), s_entries, metadata, protect, (), durable)
                outputs.append(s_outs[s])
            for name in x_out.order(x_entries):
                info = global_ckpt.infos[name]
                for o in outputs:
                    if name in o.rows:
                        o.begin(name)
                if info.dtype not in FLOAT_DTYPES:
                    _copy_tensor(copy_from, name, x_out)
                    continue
                for lo in range(0, info.numel, CHUNK_ELEMENTS):
                    n = min(CHUNK_ELEMENTS, info.numel - lo)
                    sources = [_address(c, name, lo, n) for c in clients]
                    chunk = Chunk(name, [a for a, _ in sources], [d for _, d in sources], lo, n, mean.ctypes.data)
                    bad = backend.weighted_sum_raw(chunk, w32, True)
                    x = _to_f32(_array(*_address(global_ckpt, name, lo, n), n))
                    delta = mean[:n] - x if kind == "weights" else mean[:n]
                    state = {}
                    for s in states:
                        state[s] = _array(*_address(state_ckpts[s], name, lo, n), n) if s in state_ckpts else None
                    with np.errstate(all="ignore"):  # NaN and inf are refused just below, by name
                        new_x, new_state = rule(x, delta, state)
                    new_x = _from_f32(new_x, info.dtype)
                    if bad or not all(_finite(t) for t in (new_x, *new_state.values())):
                        raise nonfinite_error(
                            name, global_ckpt, [*clients, *state_ckpts.values()], "the new global model or its state"
                        )
                    x_out.write(name, lo, new_x)
                    for s in states:
                        s_outs[s].write(name, lo, new_state[s])
            for o in outputs:
                o.finish()
            for c in [global_ckpt, *clients, *opened]:
                c.check_unchanged()
            # The state files first: a crash between the renames leaves them a round ahead of the old model, which
            # load_state_dict refuses (their metadata names the round), rather than a new model beside old state.
            _commit_together([o for o in [*outputs[1:], outputs[0]] if o.target is not None])
        except BaseException:
            for o in outputs:
                o.abort()
            raise
        finally:
            for c in [global_ckpt, *clients]:
                c.release()
            for c in opened:
                c.close()
    return x_out.result(x_entries), {s: s_outs[s].result(s_entries) for s in states}


def _finite(a) -> bool:
    """Whether every value of a is finite: one sum, finite only if every term is; and only when it
    is not, the exact test (a sum of finite values may overflow)."""
    import numpy as np

    if a.dtype == np.uint16:  # bf16 bits: the exponent all ones
        return not bool(np.any((a & 0x7F80) == 0x7F80))
    return math.isfinite(float(np.sum(a, dtype=np.float32))) or bool(np.isfinite(a).all())


def _to_f32(a):
    """A chunk in fp32, exactly (bf16 widened by its bits; F32 as it is, no copy)."""
    import numpy as np

    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a if a.dtype == np.float32 else a.astype(np.float32)


def _from_f32(a, dtype: str):
    """fp32 -> dtype with round to nearest even (numpy's fp16 cast is; bf16 by its bits as the contract's round_to,
    for the finite values a step keeps)."""
    import numpy as np

    if dtype == "F32":
        return a
    if dtype == "F16":
        return a.astype(np.float16)
    u = a.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _check_state(ckpt, state: str, entries) -> None:
    """A state file or dict holds exactly the global model's float tensors, as F32 of their shapes."""
    table = ckpt.table
    want = {n for n, _, _ in entries}
    if len(table) != len(want) or any(table.find(n) < 0 for n in want):
        raise PlanError(f"{ckpt.name}: its tensors are not the global model's float tensors")
    for n, _, shape in entries:
        r = table.find(n)
        if table.dtype(r) != "F32" or tuple(table.shape(r)) != tuple(shape):
            raise PlanError(
                f"{ckpt.name}: tensor {n!r} is {table.dtype(r)} {list(table.shape(r))}, expected F32 {list(shape)}"
            )


def _address(ckpt, name: str, lo: int, n: int) -> tuple:
    """(address, dtype) of elements [lo, lo + n) of a tensor in the checkpoint's window (valid until the next read of
    the same checkpoint)."""
    table = ckpt.table
    row = table.find(name)
    dtype = table.dtype(row)
    size = SAFETENSORS_SIZES[dtype]
    begin = table.begin(row) + lo * size
    return ckpt.address_at(row, begin, begin + n * size), dtype


def _array(addr: int, dtype: str, n: int):
    """n elements at addr as a flat numpy array, no copy (bf16 as uint16 bits; other dtypes as their bytes)."""
    import numpy as np

    size = SAFETENSORS_SIZES[dtype]
    if n == 0:
        return np.empty(0, dtype=_NUMPY.get(dtype, f"V{size}"))
    buf = (ctypes.c_char * (n * size)).from_address(addr)
    return np.frombuffer(buf, dtype=_NUMPY.get(dtype, f"V{size}"), count=n)


def _copy_tensor(src, name: str, out) -> None:
    """An integer or bool buffer, byte for byte, from `src`."""
    numel = src.infos[name].numel
    step = max(1, OUTPUT_BUFFER_BYTES // SAFETENSORS_SIZES[src.infos[name].dtype])
    for lo in range(0, numel, step):
        n = min(step, numel - lo)
        out.write(name, lo, _array(*_address(src, name, lo, n), n))


class _Output:
    """One output model: torch tensors in memory (`target` None) or an OutputTarget written through a FileSink."""

    def __init__(self, entries, target):
        self.target = target
        self.sink = None
        self.rows = {n: i for i, (n, _, _) in enumerate(entries)}
        self.tensors = None
        if target is None:
            import torch

            self.tensors = {n: torch.empty(shape, dtype=to_torch(d)) for n, d, shape in entries}
        else:
            target.create()
            self.sink = FileSink(target, OUTPUT_BUFFER_BYTES)

    def order(self, entries) -> list:
        """The order to walk the tensors in: the file's layout (each FileSink then writes straight through)."""
        if self.target is None:
            return [n for n, _, _ in entries]
        return self.target.layout.names()

    def begin(self, name: str) -> None:
        if self.sink is not None:
            self.sink.begin_tensor(self.target.layout.find(name))

    def write(self, name: str, lo: int, a) -> None:
        """Elements [lo, lo + len(a)) of tensor `name` (the file's tensors come in order, each chunk after the last)."""
        nbytes = a.nbytes
        if self.sink is None:
            t = self.tensors[name]
            ctypes.memmove(t.data_ptr() + lo * t.element_size(), a.ctypes.data, nbytes)
            return
        pos = 0
        while pos < nbytes:
            n = min(self.sink.capacity, nbytes - pos)
            ctypes.memmove(self.sink.reserve(n), a.ctypes.data + pos, n)
            self.sink.advance(n)
            self.sink.flush_if_full()
            pos += n

    def finish(self) -> None:
        if self.sink is not None:
            self.sink.finish()
            self.sink = None

    def abort(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None
        if self.target is not None:
            self.target.abort()

    def result(self, entries):
        if self.target is None:
            return {n: self.tensors[n] for n, _, _ in entries}
        return self.target.paths


def _output(path, entries, metadata, protect, aux, durable) -> _Output:
    if path is None:
        return _Output(entries, None)
    target = OutputTarget(path, entries, metadata=metadata, input_files=protect, aux_files=aux, durable=durable)
    return _Output(entries, target)


def _commit_together(outputs) -> None:
    """Renames every output's files into place only when all are written: each one's temporaries get their names
    first (the step that can fail for want of space), then each target renames its files; signals wait till the
    end."""
    with deferred_termination():
        for o in outputs:
            for temp in [s.temp for s in o.target.shards] + o.target._extras:
                temp.materialize()
        for o in outputs:
            o.target.commit()
