"""The contenders that are not pysoup, each a command the harness times as a whole process:

    python baselines.py io_floor OUT IN...        read every input byte once, write the output's bytes; no arithmetic
    python baselines.py naive OUT IN...           the script a user writes: safetensors + torch, sum in fp32, save
    python baselines.py naive_numpy OUT IN...     the same with numpy only (where torch is not installed)
    python baselines.py mergekit CONFIG OUT       mergekit's own command line on a YAML config
    python baselines.py open_keys LIB PATH        open one file with pysoup or safetensors, count its keys

The harness runs this file by its path, not with `-m`: `-m pysoup.bench.baselines` would import pysoup first,
and its import time would be charged to the floor. So this module imports nothing of pysoup.
"""

from __future__ import annotations

import importlib.util
import json
import mmap
import os
import shutil
import struct
import sys
import time

WINDOW = 64 << 20


def command(name: str, *args: str) -> list:
    """The command line that runs baseline `name` with `args` under this interpreter."""
    return [sys.executable, os.path.abspath(__file__), name, *args]


def torch_and_safetensors_available() -> bool:
    """Whether the torch + safetensors script can run here (else the numpy one stands in)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "safetensors"))


def mergekit_executable() -> str | None:
    """mergekit's `mergekit-yaml` when mergekit imports here, else None (mergekit is an optional contender)."""
    try:
        import mergekit  # noqa: F401 - the top-level package is light (~30 ms); torch loads in mergekit-yaml
    except Exception:
        return None
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    return exe if os.access(exe, os.X_OK) else shutil.which("mergekit-yaml")


def model_file(path: str) -> str:
    """A checkpoint's weights file: the path itself, or model.safetensors inside a Hugging Face directory."""
    return os.path.join(path, "model.safetensors") if os.path.isdir(path) else path


# -- the I/O floor -----------------------------------------------------------------------------------------------


def _scan(path: str) -> int:
    import numpy as np

    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    acc = 0
    for off in range(0, size, WINDOW):
        n = min(WINDOW, size - off)
        mm = mmap.mmap(fd, n, offset=off, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        words = np.frombuffer(mm, dtype=np.uint64, count=n // 8)
        acc ^= int(np.bitwise_xor.reduce(words))  # touches every byte
        del words
        mm.close()
    os.close(fd)
    return acc


def io_floor(out: str, inputs: list) -> None:
    """Reads every input byte once through mmap (two threads, as pysoup uses), then writes the first input's
    size of bytes to `out` through a temporary file renamed into place."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    files = [model_file(p) for p in inputs]
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(_scan, files))
    size = os.path.getsize(files[0])
    buf = np.ones(16 << 20, dtype=np.uint8)
    tmp = out + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for off in range(0, size, len(buf)):
        os.pwrite(fd, memoryview(buf)[: min(len(buf), size - off)], off)
    os.close(fd)
    os.replace(tmp, out)


# -- naive scripts -----------------------------------------------------------------------------------------------


def naive(out: str, inputs: list) -> None:
    """The script a user writes: load every input with safetensors, sum in fp32 with uniform weights, save."""
    import torch
    from safetensors.torch import load_file, save_file

    sds = [load_file(model_file(p)) for p in inputs]
    w = 1.0 / len(sds)
    merged = {}
    for k, first in sds[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float32)
        for sd in sds:
            acc += w * sd[k].float()
        merged[k] = acc.to(first.dtype)
    save_file(merged, out, metadata={"format": "pt"})


_NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}  # numpy has no bfloat16: its bits as uint16


def _read_safetensors(path: str) -> tuple:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    return header, data


def naive_numpy(out: str, inputs: list) -> None:
    """The numpy script a user writes: read every file whole, sum in fp32 with uniform weights, write one file
    (bf16 widened by a shift, narrowed with round-to-nearest-even)."""
    import numpy as np

    models = [_read_safetensors(model_file(p)) for p in inputs]
    w = np.float32(1.0 / len(models))
    header0 = models[0][0]
    arrays, offset, entries = [], 0, {}
    for name in sorted(header0, key=lambda k: header0[k]["data_offsets"][0]):
        info = header0[name]
        acc = np.zeros(int(np.prod(info["shape"], dtype=np.int64)), dtype=np.float32)
        for header, data in models:
            t = header[name]
            begin, end = t["data_offsets"]
            x = np.frombuffer(data[begin:end], dtype=_NUMPY_DTYPES[t["dtype"]])
            acc += w * ((x.astype(np.uint32) << 16).view(np.float32) if t["dtype"] == "BF16" else x.astype(np.float32))
        if info["dtype"] == "BF16":
            u = acc.view(np.uint32)
            y = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        else:
            y = acc.astype(_NUMPY_DTYPES[info["dtype"]])
        entries[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + y.nbytes]}
        arrays.append(y)
        offset += y.nbytes
    text = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for y in arrays:
            f.write(y.tobytes())


# -- mergekit ----------------------------------------------------------------------------------------------------


def mergekit(config: str, out: str) -> None:
    """mergekit on a YAML config, through its own command line (model card, tokenizer copy left out)."""
    import subprocess

    exe = mergekit_executable()
    if exe is None:
        raise SystemExit("mergekit is not installed")
    subprocess.run(
        [exe, config, out, "--no-copy-tokenizer", "--quiet", "--no-write-model-card"],
        check=True,
        stdout=subprocess.DEVNULL,
    )


# -- opening a file of many tensors ------------------------------------------------------------------------------


def open_keys(lib: str, path: str) -> None:
    """Opens one safetensors file and counts its keys with pysoup or safetensors. The library (and for
    safe_open(..., "pt"), torch) is imported before the clock starts; the time of the call goes to stderr as
    `OPEN_KEYS_SECONDS <seconds> <keys>`."""
    if lib == "pysoup":
        import pysoup

        t = time.perf_counter()
        with pysoup.open(path) as ckpt:
            n = len(ckpt.keys())
        dt = time.perf_counter() - t
    else:
        import torch  # noqa: F401 - safe_open(..., "pt") imports it on open
        from safetensors import safe_open

        t = time.perf_counter()
        with safe_open(path, "pt") as f:
            n = len(f.keys())
        dt = time.perf_counter() - t
    sys.stderr.write(f"OPEN_KEYS_SECONDS {dt} {n}\n")


def open_keys_seconds(stderr: str) -> float | None:
    """The in-process time open_keys printed, from a run's stderr (None when it printed none)."""
    for line in stderr.splitlines():
        if line.startswith("OPEN_KEYS_SECONDS "):
            return float(line.split()[1])
    return None


def main(argv: list) -> None:
    name, args = argv[0], argv[1:]
    if name in ("io_floor", "naive", "naive_numpy"):
        {"io_floor": io_floor, "naive": naive, "naive_numpy": naive_numpy}[name](args[0], args[1:])
    elif name == "mergekit":
        mergekit(args[0], args[1])
    elif name == "open_keys":
        open_keys(args[0], args[1])
    else:
        raise SystemExit(f"unknown baseline {name!r}")


if __name__ == "__main__":
    # Run by path, this file's directory is first on sys.path; the package's other modules must not shadow
    # anything the baselines import.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]
    main(sys.argv[1:])
