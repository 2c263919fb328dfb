"""Random inputs and bit-exact comparison."""

import torch


def random_tensor(shape, dtype, seed=0, wide=False):
    """Normal values; `wide` spreads exponents over 2^-30..2^30 to exercise rounding everywhere."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if wide:
        x = x * torch.exp2(torch.randint(-30, 30, x.shape, generator=g).float())
    return x.to(dtype)


def bits(t):
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def assert_bit_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = (bits(a) != bits(b)).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} elements differ; first at {diff[0].tolist()}"
