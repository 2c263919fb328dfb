"""The fused LoRA fold kernel (op table: lora_fold_raw; csrc/cpu/lora_fold*) against the torch reference, bit for bit:
every ISA this CPU runs, 1 and 2 threads, ragged edges (rows and columns not multiples of the micro-tile, K not a
multiple of anything), W in fp32/fp16/bf16, NaN and inf, and the one-line errors of bad arguments."""

import numpy as np
import pytest
import torch

from pysoup import _native
from pysoup.errors import BackendError
from pysoup.ops import reference
from pysoup.ops.table import Chunk

pytestmark = pytest.mark.skipif(not _native.available, reason="the C++ module did not load")

_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_BITS = {"F32": torch.int32, "F16": torch.int16, "BF16": torch.int16}
# (rows, cols, K): one element; under one micro-tile; ragged in both directions around the AVX2 6 x 16 and the
# AVX-512 14 x 32 tiles; more columns than one 512-column block of R; more rows than one strip (96 / 112), so two
# threads share them; K = 3 adapters of ranks 8, 16 and 41.
SHAPES = [(1, 1, 1), (5, 15, 3), (13, 33, 7), (29, 70, 65), (120, 530, 5), (230, 40, 8 + 16 + 41)]


def _isas():
    from pysoup.ops.cpu import usable_isas

    return usable_isas()


def _case(rows, cols, k, w_dtype, seed, specials):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * 0.05).to(_TORCH[w_dtype])
    # L = the scaled B's, R = the A's: values like a rank-k update's, of mixed sign and magnitude.
    left = (torch.randn(rows, k, generator=g) * 0.3).numpy()
    right = (torch.randn(k, cols, generator=g) * 0.3).numpy()
    if specials and rows * cols > 4:
        w.view(-1)[1] = float("nan")
        w.view(-1)[2] = float("inf")
        left[rows // 2, 0] = np.inf  # inf times a zero is NaN; times the rest of the row, +-inf
        right[0, cols // 2] = 0.0
        right[k - 1, cols - 1] = np.nan
    return w.contiguous(), np.ascontiguousarray(left), np.ascontiguousarray(right)


def _run(fold_raw, w, left, right, out_dtype):
    rows, cols = w.shape
    out = torch.empty(rows * cols, dtype=_TORCH[out_dtype])
    w_dtype = next(d for d, t in _TORCH.items() if t == w.dtype)
    chunk = Chunk("w", [w.data_ptr()], [w_dtype], 0, rows * cols, out.data_ptr(), out_dtype)
    nonfinite = fold_raw(chunk, left, right)
    return out.view(_BITS[out_dtype]), nonfinite


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("w_dtype", ["F32", "F16", "BF16"])
def test_kernel_equals_reference_bit_for_bit(shape, w_dtype):
    from pysoup.ops.cpu import CpuBackend

    rows, cols, k = shape
    for specials in (False, True):
        w, left, right = _case(rows, cols, k, w_dtype, seed=rows * cols + k, specials=specials)
        # the output in the weight's dtype (what the fold writes), and a bf16 weight widened into fp32
        for out_dtype in {w_dtype, "F32"}:
            want, want_bad = _run(reference.lora_fold_raw, w, left, right, out_dtype)
            assert (want_bad > 0) == (specials and rows * cols > 4)
            for isa in _isas():
                for threads in (1, 2):
                    got, bad = _run(CpuBackend(threads, isa).lora_fold_raw, w, left, right, out_dtype)
                    assert torch.equal(got, want), (isa, threads, out_dtype, specials)
                    assert bad == want_bad, (isa, threads, out_dtype, specials)


def test_reference_in_row_slices_equals_kernel():
    """Rows longer than the reference's slice (256 Ki elements): it computes them a row at a time, same bits."""
    from pysoup.ops.cpu import CpuBackend

    w, left, right = _case(3, (1 << 18) + 5, 2, "BF16", seed=1, specials=True)
    want, want_bad = _run(reference.lora_fold_raw, w, left, right, "BF16")
    got, bad = _run(CpuBackend(2, _isas()[-1]).lora_fold_raw, w, left, right, "BF16")
    assert torch.equal(got, want) and bad == want_bad > 0


def test_reference_numerics_are_the_stated_ones():
    """The reference itself: each element is fp32(W) + the products fma'd in k order from +0 (checked against an
    fp64 sum where every step is exact), a NaN written as 0x7FC00000, one rounding to the output dtype."""
    # Products and sums exact in fp32: small integers times powers of two.
    w = torch.tensor([[3.0, -0.0, 5.0], [-2.0, 0.0, 7.0]], dtype=torch.bfloat16)
    left = np.array([[1.0, 2.0], [0.5, -0.0]], dtype=np.float32)
    right = np.array([[4.0, 0.0, 1.0], [-1.0, -0.0, 8.0]], dtype=np.float32)
    got, bad = _run(reference.lora_fold_raw, w, left, right, "F32")
    want = w.double() + torch.from_numpy(left).double() @ torch.from_numpy(right).double()
    assert torch.equal(got.view(torch.float32), want.float().reshape(-1)) and bad == 0
    # -0 + (+0 + -0 products) is +0: the sum starts from +0 (as PEFT's W + BA does)
    assert got.view(torch.float32)[1].item() == 0.0 and got[1].item() == 0
    # NaN from W or from inf * 0 in the sum: the one quiet NaN, rounded to bf16 as 0x7FC0
    w = torch.tensor([[float("nan"), 1.0]], dtype=torch.bfloat16)
    left = np.array([[np.inf]], dtype=np.float32)
    right = np.array([[1.0, 0.0]], dtype=np.float32)
    got, bad = _run(reference.lora_fold_raw, w, left, right, "BF16")
    assert got.tolist() == [0x7FC0, 0x7FC0] and bad == 2


def test_kernel_rounds_once_from_the_fused_sum():
    """An fma keeps the product's low bits that a separate multiply would round away: the kernel's last bit follows
    the fused definition, not (L * R rounded) + acc."""
    from pysoup.ops.cpu import CpuBackend

    a = np.float32(1 + 2**-12)
    left = np.array([[np.float32(-1.0), a]], dtype=np.float32)
    right = np.array([[np.float32(1 + 2**-11)], [a]], dtype=np.float32)
    # k = 0: acc = -(1 + 2^-11), exact. k = 1: a*a = 1 + 2^-11 + 2^-24, which rounded alone is 1 + 2^-11 (a tie, to
    # even), so a multiply then an add gives 0; the fma gives 2^-24.
    w = torch.zeros(1, 1, dtype=torch.float32)
    for isa in _isas():
        got, _ = _run(CpuBackend(1, isa).lora_fold_raw, w, left, right, "F32")
        assert got.view(torch.float32).item() == 2.0**-24, isa


def test_bad_arguments_one_line_errors():
    from pysoup.ops.cpu import CpuBackend

    be = CpuBackend(1)
    w, left, right = _case(4, 8, 3, "BF16", 0, False)
    with pytest.raises(BackendError, match="C-contiguous fp32"):
        _run(be.lora_fold_raw, w, left.astype(np.float64), right, "BF16")
    with pytest.raises(BackendError, match="C-contiguous fp32"):
        _run(be.lora_fold_raw, w, left, np.asfortranarray(right), "BF16")
    with pytest.raises(BackendError, match="elements"):
        _run(be.lora_fold_raw, w, left[:3], right, "BF16")
    with pytest.raises(ValueError, match="null pointer"):
        _native.native.lora_fold(0, 2, left.ctypes.data, right.ctypes.data, 4, 8, 3, 0, 2, 1, 0)


# -- the fold's output on tmpfs (pysoup.io.writer: no eager allocation there, its free space checked instead) --------
@pytest.fixture(scope="module")
def tiny_fold(tmp_path_factory):
    """A tiny bf16 Llama and a PEFT adapter on its attention and MLP, made by transformers and PEFT."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("tiny_fold")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    lora = peft.LoraConfig(r=5, lora_alpha=7, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    peft.get_peft_model(model.float(), lora).save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def _mount_tmpfs(path, size):
    import subprocess

    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount here: {proc.stderr.decode().strip()}")
    return path


def test_fold_on_tmpfs_is_not_preallocated_and_equals_disk(tiny_fold, tmp_path, monkeypatch):
    import os
    import subprocess

    from pysoup.io.writer import _on_tmpfs
    from pysoup.lora import fold

    base, adapter = tiny_fold
    fs = _mount_tmpfs(tmp_path / "shm", "4m")
    try:
        calls = []
        real = os.posix_fallocate
        monkeypatch.setattr(os, "posix_fallocate", lambda fd, off, n: calls.append(n) or real(fd, off, n))
        fold(base, [adapter], fs / "out.safetensors")
        assert calls == []  # tmpfs: pwrite allocates (and zeroes) the pages, on the writer thread
        fold(base, [adapter], tmp_path / "out.safetensors")
        fd = os.open(tmp_path, os.O_RDONLY)
        on_tmpfs = _on_tmpfs(fd)
        os.close(fd)
        assert (calls == []) == on_tmpfs  # a disk is still allocated up front
        assert (fs / "out.safetensors").read_bytes() == (tmp_path / "out.safetensors").read_bytes()
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)


def test_fold_onto_full_tmpfs_fails_before_any_kernel_call(tiny_fold, tmp_path, monkeypatch):
    import os
    import subprocess

    from pysoup.errors import OutputError
    from pysoup.lora import fold
    from pysoup.ops.cpu import CpuBackend

    base, adapter = tiny_fold
    fs = _mount_tmpfs(tmp_path / "small", "64k")  # the output is ~100 KiB
    calls = []
    real = CpuBackend.lora_fold_raw
    monkeypatch.setattr(CpuBackend, "lora_fold_raw", lambda self, *a: calls.append(1) or real(self, *a))
    try:
        with pytest.raises(OutputError, match="No space left on device") as err:
            fold(base, [adapter], fs / "out" / "model")
        assert "\n" not in str(err.value)
        assert calls == [] and os.listdir(fs) == []  # detected up front; nothing made is left
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)


def test_fold_refuses_rows_longer_than_the_output_buffer(tiny_fold, tmp_path, monkeypatch):
    """The kernel writes whole rows into the output buffer: a longer row is a one-line PlanError before any output."""
    import os
    import sys

    from pysoup.errors import PlanError
    from pysoup.lora import fold

    base, adapter = tiny_fold
    monkeypatch.setattr(sys.modules["pysoup.lora.fold"], "BUFFER_BYTES", 150)  # q_proj's rows: 64 bf16; down_proj's: 96
    with pytest.raises(PlanError, match="down_proj.weight': a row of 192 bytes is larger than the 150-byte output"):
        fold(base, [adapter], tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_fold_threads_and_backends_give_the_same_bytes(tiny_fold, tmp_path):
    """Rows cut among 1, 2 or 3 threads, the C++ kernel or the torch reference: the same output file."""
    from pysoup.errors import PlanError
    from pysoup.lora import fold

    base, adapter = tiny_fold
    outs = []
    for i, (threads, backend) in enumerate([(1, "cpu"), (2, "cpu"), (3, "cpu"), (1, "reference")]):
        report = fold(base, [adapter, adapter], tmp_path / f"{i}.safetensors", weights=[0.5, -1.25], threads=threads,
                      backend=backend)  # fmt: skip
        assert report.folded and not report.nonfinite_tensors
        outs.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert all(o == outs[0] for o in outs[1:])
    with pytest.raises(PlanError, match="at least 1 thread, got 0"):
        fold(base, [adapter], tmp_path / "none.safetensors", threads=0)


# -- tensors copied file to file (FileSink.write_from: copy_file_range on the writer thread) ----------------------
def test_fold_copies_file_to_file_with_the_same_bytes(tiny_fold, tmp_path, monkeypatch):
    """Every copied tensor sent through FileSink.write_from (in the kernel, or read and written where the files
    cannot be copied between) gives the bytes of the buffered copy, into one file and into shards."""
    import errno
    import os
    import sys

    from pysoup.lora import fold

    mod = sys.modules["pysoup.lora.fold"]
    base, adapter = tiny_fold
    fold(base, [adapter], tmp_path / "buffered.safetensors")
    fold(base, [adapter], tmp_path / "buffered", shard_size="40KB")
    calls = []
    real = os.copy_file_range
    monkeypatch.setattr(mod, "_DIRECT_COPY_BYTES", 1)  # the embeddings, the head and the norms
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(a[2]) or real(*a))
    fold(base, [adapter], tmp_path / "direct.safetensors")
    fold(base, [adapter], tmp_path / "direct", shard_size="40KB")
    assert len(calls) >= 2 * 5  # embed_tokens, lm_head and three norms, in each output

    def refuse(*a):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "copy_file_range", refuse)  # e.g. another file system since Linux 5.19
    fold(base, [adapter], tmp_path / "fallback.safetensors")
    want = (tmp_path / "buffered.safetensors").read_bytes()
    assert (tmp_path / "direct.safetensors").read_bytes() == want
    assert (tmp_path / "fallback.safetensors").read_bytes() == want
    shards = sorted(os.listdir(tmp_path / "buffered"))
    assert len([s for s in shards if s.endswith(".safetensors")]) > 1
    assert shards == sorted(os.listdir(tmp_path / "direct"))
    for name in shards:
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "buffered" / name).read_bytes()


def _base_to_cut_and_older_output(tiny_fold, tmp_path, out):
    """A copy of the tiny base that a test may truncate, and an older fold of it already at `out`: (the copy, its
    weights file)."""
    import shutil

    from pysoup.lora import fold

    base, adapter = tiny_fold
    mine = tmp_path / "base"
    shutil.copytree(base, mine)
    fold(mine, [adapter], out)
    return mine, mine / "model.safetensors"


def test_fold_copy_from_a_base_that_shrinks_fails_and_writes_nothing(tiny_fold, tmp_path, monkeypatch):
    """A base truncated while a tensor is copied from it file to file: a one-line FormatError naming it, no output,
    an older output at the target untouched; a failing copy: a one-line OutputError, the same."""
    import errno
    import os
    import sys

    from pysoup.errors import FormatError, OutputError
    from pysoup.lora import fold

    mod = sys.modules["pysoup.lora.fold"]
    base, adapter = tiny_fold
    out = tmp_path / "out"
    mine, weights = _base_to_cut_and_older_output(tiny_fold, tmp_path, out)
    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(mod, "_DIRECT_COPY_BYTES", 1)
    real = os.copy_file_range

    def shrink_then_copy(src, dst, n, src_off, dst_off):
        os.truncate(weights, src_off)  # everything from here on is gone
        return real(src, dst, n, src_off, dst_off)

    monkeypatch.setattr(os, "copy_file_range", shrink_then_copy)
    with pytest.raises(FormatError, match="changed while being read") as err:
        fold(mine, [adapter], out)
    assert str(weights) in str(err.value) and "\n" not in str(err.value)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(out)) == sorted(os.listdir(base))  # no temporary left beside it

    def fail(*a):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "copy_file_range", fail)
    with pytest.raises(OutputError, match="write failed") as err:
        fold(base, [adapter], out)
    assert "\n" not in str(err.value)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(out)) == sorted(os.listdir(base))


def test_fold_of_a_base_truncated_under_the_kernel_fails_and_writes_nothing(tiny_fold, tmp_path, monkeypatch):
    """A base cut short after the fold opened it: the blocks of W the kernel reads (mapped unpopulated, guarded)
    read zeros past the end instead of killing the process, and the fold fails with a one-line FormatError; the
    older output at the target is untouched."""
    import os
    import sys

    from pysoup.errors import FormatError
    from pysoup.lora import fold

    mod = sys.modules["pysoup.lora.fold"]
    base, adapter = tiny_fold
    out = tmp_path / "out.safetensors"
    mine, weights = _base_to_cut_and_older_output(tiny_fold, tmp_path, out)
    before = out.read_bytes()
    real = mod._FactorsAhead.take

    def take_then_truncate(self, name):
        os.truncate(weights, 4096)  # every weight's bytes gone before the first block is read
        return real(self, name)

    monkeypatch.setattr(mod._FactorsAhead, "take", take_then_truncate)
    with pytest.raises(FormatError, match="changed while being read") as err:
        fold(mine, [adapter], out)
    assert str(weights) in str(err.value) and "\n" not in str(err.value)
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["base", "out.safetensors"]
