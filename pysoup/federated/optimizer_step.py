"""The server-optimizer step of FedOpt and FedAvgM: per element, the clients' weighted mean update, then the
optimizer's state update and the new global model.

Each element has several outputs (the new x, and m, v or the momentum), so this is not one engine merge: it walks
the tensors, each in chunks of CHUNK_ELEMENTS, reads every input through its checkpoint's sliding window (zero copy;
the engine's readers, so resident memory stays a few windows), runs the fused weighted-sum kernel for the mean and
torch's fp32 elementwise ops for the rule, and writes each output through its own OutputTarget. The files are
renamed into place together, only when every one of them is written: a failure leaves the old model and the old
optimizer state as they were.
"""

from __future__ import annotations

import ctypes

from pysoup.dtypes import SAFETENSORS_SIZES, to_torch
from pysoup.errors import PlanError
from pysoup.federated.updates import FLOAT_DTYPES, nonfinite_error
from pysoup.io.checkpoint import open_checkpoint
from pysoup.io.signals import cleanup_on_termination, deferred_termination
from pysoup.io.writer import FileSink, OutputTarget

# 1 Mi elements: each fp32 temporary of the rule is 4 MiB (a step makes about ten), and an input's span fits the
# 4 MiB windows the aggregators open checkpoints with here.
CHUNK_ELEMENTS = 1 << 20
STEP_WINDOW_BYTES = 4 << 20
# Two buffers of this size per output file.
OUTPUT_BUFFER_BYTES = 4 << 20


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
        weights: one weight per client; the mean update is weighted_sum(clients, weights, normalize=True) in fp32,
            minus x when clients send weights.
        rule: rule(x, delta, state) -> (new x, {state name: new value}), on fp32 chunks; `rule.states` names the
            state tensors it keeps (state values are None in the first round).
        state_in: {state name: None, a dict of fp32 torch tensors, or a safetensors path}.
        out: None for a dict of torch tensors, else a .safetensors path or a directory for the new global model.
        state_out: {state name: None (keep it in memory) or a .safetensors path}.
        metadata: the __metadata__ of the state files.

    Returns:
        (the new global model: a dict or out's paths, {state name: a dict of fp32 tensors or the file's path}).
    """
    import torch

    from pysoup.ops import weighted_sum
    from pysoup.ops.reference import exact_f32, round_to

    states = tuple(rule.states)
    floats = [n for n in global_ckpt.infos if global_ckpt.infos[n].dtype in FLOAT_DTYPES]
    x_entries = [(n, i.dtype, i.shape) for n, i in global_ckpt.infos.items()]
    s_entries = [(n, "F32", global_ckpt.infos[n].shape) for n in floats]
    copy_from = clients[0] if kind == "weights" else global_ckpt  # integer buffers
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
            w32 = [float(w) for w in weights]
            for name in x_out.order(x_entries):
                numel = global_ckpt.infos[name].numel
                for o in outputs:
                    if name in o.rows:
                        o.begin(name)
                if global_ckpt.infos[name].dtype not in FLOAT_DTYPES:
                    _copy_tensor(copy_from, name, x_out)
                    continue
                dtype = to_torch(global_ckpt.infos[name].dtype)
                for lo in range(0, numel, CHUNK_ELEMENTS):
                    n = min(CHUNK_ELEMENTS, numel - lo)
                    x = exact_f32(_view(global_ckpt, name, lo, n))
                    mean = weighted_sum(
                        [_view(c, name, lo, n) for c in clients], w32, torch.float32, True, threads=threads
                    )
                    delta = mean - x if kind == "weights" else mean
                    state = {s: (_view(state_ckpts[s], name, lo, n) if s in state_ckpts else None) for s in states}
                    new_x, new_state = rule(x, delta, state)
                    new_x = round_to(new_x, dtype)
                    if not bool(torch.isfinite(new_x).all()) or not all(
                        bool(torch.isfinite(v).all()) for v in new_state.values()
                    ):
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
            _commit_together([o for o in outputs if o.target is not None])
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


def _view(ckpt, name: str, lo: int, n: int):
    """Elements [lo, lo + n) of a tensor as a flat torch tensor over the checkpoint's window (valid until the next
    read of the same checkpoint)."""
    import torch

    table = ckpt.table
    row = table.find(name)
    dtype = table.dtype(row)
    size = SAFETENSORS_SIZES[dtype]
    begin = table.begin(row) + lo * size
    addr = ckpt.address_at(row, begin, begin + n * size)
    buf = (ctypes.c_char * (n * size)).from_address(addr)
    return torch.frombuffer(buf, dtype=torch.uint8).view(to_torch(dtype))


def _copy_tensor(src, name: str, out) -> None:
    """An integer or bool buffer, byte for byte, from `src`."""
    numel = src.infos[name].numel
    step = max(1, OUTPUT_BUFFER_BYTES // SAFETENSORS_SIZES[src.infos[name].dtype])
    for lo in range(0, numel, step):
        out.write(name, lo, _view(src, name, lo, min(step, numel - lo)))


class _Output:
    """One output model: torch tensors in memory (`target` None) or an OutputTarget written through a FileSink."""

    def __init__(self, entries, target):
        import torch

        self.target = target
        self.sink = None
        self.rows = {n: i for i, (n, _, _) in enumerate(entries)}
        self.tensors = None
        if target is None:
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

    def write(self, name: str, lo: int, t) -> None:
        if self.sink is None:
            self.tensors[name].view(-1)[lo : lo + t.numel()].copy_(t)
        else:
            self.write_raw(name, t)

    def write_raw(self, name: str, t) -> None:
        nbytes = t.numel() * t.element_size()
        pos = 0
        while pos < nbytes:
            n = min(self.sink.capacity, nbytes - pos)
            ctypes.memmove(self.sink.reserve(n), t.data_ptr() + pos, n)
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
