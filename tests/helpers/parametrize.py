"""The axes tests run over, and readable ids for them ("isa=avx2", "out=bfloat16")."""

import torch

import pysoup

# Every ISA this machine runs (scalar first); tests cover each one.
ISAS = pysoup.info()["cpu_isas"]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def id_formatter(label):
    """Readable test ids: id_formatter("threads")(2) -> "threads=2", id_formatter("shape")((3, 5)) -> "shape=3x5"."""

    def fmt(value):
        if isinstance(value, tuple):
            return f"{label}={'x'.join(map(str, value))}"
        return f"{label}={getattr(value, '__name__', str(value).replace('torch.', ''))}"

    return fmt
