"""Writing adapter directories PEFT loads: `adapter_model.safetensors` streamed through pysoup's OutputTarget
(laid out up front, written to temporaries, renamed into place) and an `adapter_config.json` that states the
result's ranks and scalings."""

from __future__ import annotations

import ctypes
import json
import os

from pysoup.errors import PlanError
from pysoup.lora.adapter import CONFIG_NAME, PREFIX, WEIGHTS_NAME, from_f32

# The output buffer of an adapter write: adapters are small, and a factor never exceeds a few MiB.
_BUFFER_BYTES = 16 << 20


def factor_keys(module: str, kind: str) -> tuple:
    """The (A, B) keys PEFT saves for a module of this kind."""
    if kind == "embedding":
        return f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B"
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def scale_one_config(template: dict, ranks: dict, target_modules, fan_in_fan_out: bool) -> dict:
    """An adapter config for factors that carry their own scale (ΔW = B·A): every module's α equals its rank, so
    PEFT's s = α / r is 1. r is the most common rank; the others go to rank_pattern / alpha_pattern under the
    module's full name (PEFT matches pattern keys against the end of the module name)."""
    counts: dict = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k))
    cfg = dict(template)
    cfg.update(
        r=r,
        lora_alpha=r,
        rank_pattern={m: k for m, k in ranks.items() if k != r},
        alpha_pattern={m: k for m, k in ranks.items() if k != r},
        use_rslora=False,
        use_dora=False,
        fan_in_fan_out=fan_in_fan_out,
        inference_mode=True,
    )
    if target_modules is not None:
        cfg.update(target_modules=target_modules, layers_to_transform=None, layers_pattern=None, exclude_modules=None)
    return cfg


def check_output(out, inputs) -> str:
    """The output directory's absolute path; refuses a .safetensors path and an input adapter's directory."""
    if out is None or os.fspath(out) == "":
        raise PlanError("an adapter merge needs an output directory")
    path = os.path.abspath(os.fspath(out))
    if path.endswith(".safetensors"):
        raise PlanError(f"{out}: an adapter output is a directory (adapter_model.safetensors + {CONFIG_NAME})")
    for ad in inputs:
        if os.path.exists(path) and os.path.samefile(path, ad.path):
            raise PlanError(f"{out}: the output would overwrite an input adapter ({ad.path})")
    return path


def write_adapter(out, entries, produce, config: dict, input_files=()) -> list:
    """Streams an adapter directory: `entries` are (key, safetensors dtype, shape) laid out up front; `produce(key)`
    returns key's values as fp32 numpy (called in the file's write order, once per key); the config is written
    beside. Nothing appears at `out` unless everything was written.

    Returns:
        The paths written.
    """
    from pysoup.io.writer import OutputTarget

    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    target = OutputTarget(
        out,
        entries,
        metadata={"format": "pt"},
        input_files=input_files,
        aux_files=[(CONFIG_NAME, config_bytes)],
        weights_name=WEIGHTS_NAME,
    )
    with target.streaming(_BUFFER_BYTES) as sink:
        for k in range(len(target.layout)):
            key, dtype = target.layout.name(k), target.layout.dtype(k)
            values = from_f32(produce(key), dtype)
            if values.nbytes != target.layout.nbytes(k):
                want = target.layout.nbytes(k)
                raise PlanError(f"tensor {key!r}: {values.nbytes} bytes where its shape takes {want}")
            sink.begin_tensor(k)
            copy_into_sink(sink, values)
        sink.finish()
    return target.paths + [os.path.join(target.out, CONFIG_NAME)]


def copy_into_sink(sink, values) -> None:
    """Copies a contiguous numpy array into the sink, in pieces of at most its buffer."""
    address, nbytes = values.ctypes.data, values.nbytes
    pos = 0
    while pos < nbytes:
        n = min(sink.capacity, nbytes - pos)
        ctypes.memmove(sink.reserve(n), address + pos, n)
        sink.advance(n)
        sink.flush_if_full()
        pos += n
