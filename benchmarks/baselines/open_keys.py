"""Opens one safetensors file and counts its keys: `open_keys.py pysoup|safetensors PATH`. The library (and for
safe_open(..., "pt"), torch) is imported before the clock starts; the time of the call goes to stderr."""

import sys
import time


def main():
    lib, path = sys.argv[1], sys.argv[2]
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


if __name__ == "__main__":
    main()
