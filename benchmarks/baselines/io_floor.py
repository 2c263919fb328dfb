"""The I/O floor: read every input byte once through mmap (two threads, as pysoup uses), then write the
output's bytes (the first input's size) through a temporary file renamed into place. No arithmetic."""

import mmap
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

WINDOW = 64 << 20


def model_file(path):
    return os.path.join(path, "model.safetensors") if os.path.isdir(path) else path


def scan(path):
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


def main():
    out, inputs = sys.argv[1], [model_file(p) for p in sys.argv[2:]]
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(scan, inputs))
    size = os.path.getsize(inputs[0])
    buf = np.ones(16 << 20, dtype=np.uint8)
    tmp = out + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for off in range(0, size, len(buf)):
        os.pwrite(fd, memoryview(buf)[: min(len(buf), size - off)], off)
    os.close(fd)
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
