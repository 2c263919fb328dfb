"""Faults around a merge (issue 9): outputs committed atomically, inputs that alias the output, inputs that
change, shrink or are not files while being read, signals and kills, read-only and full file systems, races
between merges. Each fault that can kill a process runs in a child process, with fixed seeds."""

import errno
import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import torch
from helpers.checkpoints import hf_dir, save_st, small_model, tree_snapshot
from helpers.cli import ROOT, run_cli
from helpers.faults import disk_full_after
from helpers.parametrize import ISAS, id_formatter

import pysoup
from pysoup.errors import FormatError, OutputError, PlanError

OLD = b"an older merge result that must survive"


def debris(root):
    return [os.path.join(r, f) for r, _d, fs in os.walk(root) for f in fs if "pysoup-tmp" in f]


def mount(*args):
    """Runs mount(8); skips the test where this process may not mount (not root, no mount namespace)."""
    proc = subprocess.run(["mount", *map(str, args)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount here: {proc.stderr.decode().strip()}")


@pytest.fixture
def tmpfs(tmp_path):
    """mount_tmpfs(size, ro=False) -> a fresh tmpfs, unmounted at the end."""
    mounted = []

    def mount_tmpfs(size="1m", ro=False):
        mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
        mnt.mkdir()
        mount("-t", "tmpfs", "-o", f"size={size}" + (",ro" if ro else ""), "tmpfs", mnt)
        mounted.append(mnt)
        return mnt

    yield mount_tmpfs
    for mnt in reversed(mounted):
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def big_inputs(tmp_path, count=2, tensors=16, elems=1 << 20, seed=0):
    """Inputs large enough that a merge takes a while (count x tensors x elems fp32)."""
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(count):
        sd = {f"layers.{j}.weight": torch.randn(elems, generator=g) for j in range(tensors)}
        paths.append(save_st(tmp_path / f"in{i}.safetensors", sd))
    return paths


def run_child(code, *args, env=None, timeout=120):
    """Runs a Python snippet in a fresh process (a crash there is a test failure here, not a dead runner)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        cwd=ROOT,
    )


# -- 1. directory outputs are committed whole ------------------------------------------------------------------
def hf_inputs(tmp_path, tokenizer_bytes=700 << 10):
    sds = [small_model(seed=s, hidden=64) for s in range(2)]
    dirs = [hf_dir(tmp_path / f"hf{i}", sd, shards=1) for i, sd in enumerate(sds)]
    with open(os.path.join(dirs[0], "tokenizer.json"), "w") as f:
        f.write(json.dumps({"vocab": "x" * tokenizer_bytes}))
    return dirs


def test_directory_output_survives_full_disk_while_copying_files(tmp_path, tmpfs):
    """The issue's case: the new weights fit, the tokenizer copy does not; the older output stays whole."""
    dirs = hf_inputs(tmp_path)
    fs = tmpfs("2m")
    out = fs / "merged"
    run_cli("merge", *dirs, "-o", out, "--no-progress", check=True)
    before = tree_snapshot(str(out))
    # Leave room for a new model.safetensors beside the old one, but not for the tokenizer's copy too.
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    room = os.path.getsize(out / "model.safetensors") + (200 << 10)
    (fs / "filler").write_bytes(b"\0" * max(0, free - room))
    proc = run_cli("merge", *dirs, "-o", out, "--weights", "0.3,0.7", "--no-progress")
    assert proc.returncode == 1 and "No space left on device" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert tree_snapshot(str(out)) == before
    assert not debris(fs)


def test_directory_output_survives_failed_copy(tmp_path, monkeypatch):
    """Without a small file system: the copy of tokenizer.json fails; nothing of the older output changed."""
    import pysoup.io.writer as writer

    dirs = hf_inputs(tmp_path, tokenizer_bytes=10)
    out = tmp_path / "merged"
    pysoup.merge(dirs, out, progress=False)
    before = tree_snapshot(str(out))

    real = writer._temp_copy

    def full_at_tokenizer(src, path):
        if path.endswith("tokenizer.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, path)

    monkeypatch.setattr(writer, "_temp_copy", full_at_tokenizer)
    with pytest.raises(OutputError, match="tokenizer.json: cannot write .No space left"):
        pysoup.merge(dirs, out, weights=[0.3, 0.7], progress=False)
    assert tree_snapshot(str(out)) == before and not debris(tmp_path)


@pytest.mark.parametrize("old_shards,new_shard_size", [(3, "6KB"), (1, "6KB"), (3, None)], ids=["3to2", "1to2", "3to1"])
def test_stale_weight_files_removed_after_new_index(tmp_path, monkeypatch, old_shards, new_shard_size):
    import pysoup.io.temporary as temporary
    import pysoup.io.writer as writer

    sds = [small_model(seed=s, hidden=32) for s in range(2)]
    dirs = [hf_dir(tmp_path / f"in{i}", sd, shards=1) for i, sd in enumerate(sds)]
    out = tmp_path / "out"
    hf_dir(out, small_model(seed=9, hidden=32), shards=old_shards)
    (out / "README.md").write_text("the user's own notes")
    events = []
    real_replace, real_unlink = os.replace, os.unlink
    monkeypatch.setattr(temporary.os, "replace", lambda a, b: (events.append(("put", b)), real_replace(a, b)))
    monkeypatch.setattr(writer.os, "unlink", lambda p: (events.append(("del", p)), real_unlink(p)))
    report = pysoup.merge(dirs, out, shard_size=new_shard_size, progress=False)
    names = sorted(os.listdir(out))
    weights = [n for n in names if n.startswith("model")]
    assert weights == sorted(os.path.basename(p) for p in report.outputs), names
    assert "README.md" in names and not debris(out)
    # Every new file is in place before an old one goes, and the index (when there is one) is the last put.
    puts = [i for i, (kind, _) in enumerate(events) if kind == "put"]
    dels = [i for i, (kind, _) in enumerate(events) if kind == "del"]
    assert dels and max(puts) < min(dels)
    if report.outputs[-1].endswith(".index.json"):
        assert events[max(puts)][1].endswith("model.safetensors.index.json")
    merged = pysoup.merge(dirs, progress=False)
    with pysoup.open(str(out)) as ckpt:
        for k, v in merged.items():
            assert torch.equal(ckpt[k], v)


# -- 2. an output that is an input under another name ----------------------------------------------------------
def test_output_hard_link_of_input_refused(tmp_path):
    sds = [small_model(seed=s) for s in range(2)]
    a, b = (save_st(tmp_path / f"{n}.safetensors", sd) for n, sd in zip("ab", sds))
    alias = tmp_path / "other" / "alias.safetensors"
    alias.parent.mkdir()
    os.link(a, alias)
    before = tree_snapshot(str(tmp_path))
    with pytest.raises(PlanError, match="would overwrite an input"):
        pysoup.merge([a, b], alias, progress=False)
    proc = run_cli("merge", a, b, "-o", alias)
    assert proc.returncode == 1 and "would overwrite an input" in proc.stderr
    assert tree_snapshot(str(tmp_path)) == before


def test_output_through_bind_mount_refused(tmp_path):
    src, alias = tmp_path / "in", tmp_path / "alias"
    src.mkdir()
    alias.mkdir()
    sds = [small_model(seed=s) for s in range(2)]
    a, b = (save_st(src / f"{n}.safetensors", sd) for n, sd in zip("ab", sds))
    mount("--bind", src, alias)
    try:
        before = tree_snapshot(str(src))
        proc = run_cli("merge", a, b, "-o", alias / "a.safetensors")
        assert proc.returncode == 1 and "would overwrite an input" in proc.stderr, proc.stderr
        with pytest.raises(PlanError, match="holds an input"):
            pysoup.merge([a, b], alias, progress=False)
        assert tree_snapshot(str(src)) == before
    finally:
        subprocess.run(["umount", str(alias)], check=False)


# -- 3. an input truncated while being read: no SIGBUS --------------------------------------------------------
TRUNCATE_DURING_MERGE = """
    import os, sys
    import pysoup.api, pysoup.cli
    victim, keep = sys.argv[1], int(sys.argv[2])
    real = pysoup.api.execute
    def execute(plan, *args, **kwargs):
        os.truncate(victim, keep)  # after the headers were read and validated, before any data is
        return real(plan, *args, **kwargs)
    pysoup.api.execute = execute
    sys.exit(pysoup.cli.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("strategy", ["linear", "ties"])
@pytest.mark.parametrize("threads", [1, 2], ids=id_formatter("threads"))
@pytest.mark.parametrize("isa", ISAS, ids=id_formatter("isa"))
def test_input_truncated_during_merge(tmp_path, isa, threads, strategy):
    a, b, base = big_inputs(tmp_path, count=3, tensors=4, elems=1 << 18)
    target = tmp_path / "out.safetensors"
    target.write_bytes(OLD)
    extra = ["--strategy", strategy] + (["--base", base] if strategy == "ties" else [])
    args = ["merge", a, b, "-o", target, "--threads", threads, "--no-progress", *extra]
    proc = run_child(TRUNCATE_DURING_MERGE, b, 4096, *args, env={"PYSOUP_CPU_ISA": isa})
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stderr.strip() == (
        f"pysoup: error: {b}: changed while being read (another process wrote or truncated it); nothing was written"
    )
    assert target.read_bytes() == OLD and not debris(tmp_path)


def test_fault_guard_turns_sigbus_into_a_flag(tmp_path):
    """The C++ guard alone: a mapped page past the new end of the file reads as zeros and is reported."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"\1" * (1 << 20))
    code = """
        import ctypes, os, sys
        from pysoup._native import native
        fd = os.open(sys.argv[1], os.O_RDWR)
        region = native.MappedRegion(fd, 0, 1 << 20, True)
        assert not region.faulted()
        os.ftruncate(fd, 4096)
        data = ctypes.string_at(region.address, 1 << 20)  # SIGBUS past 4096 without the guard
        assert data[:4096] == b"\\1" * 4096 and data[8192:] == bytes(len(data) - 8192), "zeros past the end"
        assert region.faulted()
        region.close()
        assert region.faulted()
        print("ok")
    """
    proc = run_child(code, path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_fault_guard_leaves_other_sigbus_fatal(tmp_path):
    """A SIGBUS that is not a read of our mappings still ends the process (here: sent by kill)."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"\1" * 8192)
    code = """
        import os, signal, sys
        from pysoup._native import native
        region = native.MappedRegion(os.open(sys.argv[1], os.O_RDONLY), 0, 8192, True)
        os.kill(os.getpid(), signal.SIGBUS)
        print("survived")
    """
    proc = run_child(code, path)
    assert proc.returncode == -signal.SIGBUS and "survived" not in proc.stdout


def test_truncation_race(tmp_path):
    """Another process truncates an input at a random moment of a real merge: a clean error or a whole
    output, never a signal, never debris (fixed seed; without the fault guard most trials die of SIGBUS)."""
    paths = big_inputs(tmp_path, count=3, tensors=16, elems=1 << 19)
    pristine = open(paths[1], "rb").read()
    target = tmp_path / "out.safetensors"
    want = pysoup.merge(paths[:2], strategy="ties", base=paths[2], progress=False)
    rng = random.Random(3)
    outcomes = []
    for _trial in range(8):
        target.write_bytes(OLD)
        proc = start_merge(tmp_path, "unnamed", "cli", paths, target)
        time.sleep(rng.uniform(0.0, 0.12))
        os.truncate(paths[1], rng.randrange(0, len(pristine) // 2))
        _, err = proc.communicate(timeout=60)
        outcomes.append(proc.returncode)
        assert proc.returncode in (0, 1), (proc.returncode, err)
        assert not debris(tmp_path)
        if proc.returncode == 1:
            assert "changed while being read" in err or "truncated file?" in err, err  # before or while reading
            assert target.read_bytes() == OLD
        else:
            assert_whole(target, want)
        with open(paths[1], "wb") as f:
            f.write(pristine)
    assert 1 in outcomes, outcomes  # the race did hit merges in flight


# -- 4. an input rewritten in place while being read -----------------------------------------------------------
def test_input_overwritten_in_place_during_merge(tmp_path):
    a, b = big_inputs(tmp_path, count=2, tensors=4, elems=1 << 16)
    target = tmp_path / "out.safetensors"
    target.write_bytes(OLD)
    code = """
        import os, sys, time
        import pysoup.api, pysoup.cli
        victim = sys.argv[1]
        real = pysoup.api.execute
        def execute(plan, *args, **kwargs):
            time.sleep(0.02)  # past the file system's timestamp granularity
            with open(victim, "r+b") as f:  # same size, other bytes
                f.seek(-64, 2)
                f.write(b"\\x7f" * 64)
            return real(plan, *args, **kwargs)
        pysoup.api.execute = execute
        sys.exit(pysoup.cli.main(sys.argv[2:]))
    """
    proc = run_child(code, b, "merge", a, b, "-o", target, "--no-progress")
    assert proc.returncode == 1 and f"{b}: changed while being read" in proc.stderr, proc.stderr
    assert target.read_bytes() == OLD and not debris(tmp_path)


# -- 5. FIFOs and devices are not checkpoints ------------------------------------------------------------------
def test_fifo_and_device_inputs_refused_without_hanging(tmp_path):
    a = save_st(tmp_path / "a.safetensors", small_model())
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    d = tmp_path / "dir"
    d.mkdir()
    os.mkfifo(d / "model.safetensors")
    for bad in (fifo, "/dev/zero", d):
        for args in (("merge", a, bad, "-o", tmp_path / "o.safetensors"), ("inspect", bad)):
            proc = subprocess.run(
                [sys.executable, "-m", "pysoup", *map(str, args)], capture_output=True, text=True, timeout=30
            )
            assert proc.returncode == 1 and "not a regular file" in proc.stderr, (bad, proc.stderr)
    with pytest.raises(FormatError, match="not a regular file"):
        pysoup.open(str(fifo))
    assert not os.path.exists(tmp_path / "o.safetensors")


# -- 6. signals and kills ----------------------------------------------------------------------------------------
MERGE_CHILD = """
    import sys
    import pysoup, pysoup.cli
    if sys.argv[1] == "named":
        import pysoup.io.temporary as temporary
        temporary._unnamed_temporaries_work = lambda directory: False
    print("ready", flush=True)  # the parent times its signal from here
    if sys.argv[2] == "api":  # the library, with the default signal actions
        pysoup.merge(sys.argv[5:], sys.argv[3], threads=1, strategy="ties", base=sys.argv[4], progress=False)
    else:
        sys.exit(pysoup.cli.main(["merge", *sys.argv[5:], "-o", sys.argv[3], "--base", sys.argv[4],
                                  "--strategy", "ties", "--threads", "1", "--no-progress"]))
"""


def start_merge(tmp_path, mode, entry, paths, target):
    *models, base = map(str, paths)
    argv = [sys.executable, "-c", textwrap.dedent(MERGE_CHILD), mode, entry, str(target), base, *models]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline() == "ready\n"
    return proc


def assert_whole(target, want):
    """The target is the older file or the complete new merge: never torn."""
    data = target.read_bytes()
    if data == OLD:
        return "old"
    with pysoup.open(str(target)) as got:
        assert all(torch.equal(got[k], v) for k, v in want.items())
    return "new"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("entry", ["cli", "api"])
def test_termination_signals_clean_up(tmp_path, sig, entry):
    paths = big_inputs(tmp_path, count=3, tensors=16, elems=1 << 19)
    target = tmp_path / "out" / "soup.safetensors"
    target.parent.mkdir()
    want = pysoup.merge(paths[:2], strategy="ties", base=paths[2], progress=False)
    rng = random.Random(int(sig))
    cleaned = 0
    for _trial in range(4):
        target.write_bytes(OLD)
        proc = start_merge(tmp_path, "unnamed", entry, paths, target)
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, -sig), (proc.returncode, err)
        assert not debris(tmp_path), err
        state = assert_whole(target, want)
        if proc.returncode == -sig and state == "old" and entry == "cli":
            assert err.strip() == f"pysoup: terminated by {signal.Signals(sig).name}; nothing was written", err
        cleaned += proc.returncode == -sig
    assert cleaned, "no trial was interrupted mid-merge"


@pytest.mark.parametrize("mode", ["unnamed", "named"])
def test_sigkill_leaves_no_debris_after_the_next_merge(tmp_path, mode):
    paths = big_inputs(tmp_path, count=3, tensors=16, elems=1 << 19)
    target = tmp_path / "out" / "soup.safetensors"
    target.parent.mkdir()
    want = pysoup.merge(paths[:2], strategy="ties", base=paths[2], progress=False)
    rng = random.Random(9)
    left = 0
    size = len(
        open(
            pysoup.merge(paths[:2], tmp_path / "w.safetensors", strategy="ties", base=paths[2]).outputs[0], "rb"
        ).read()
    )
    for trial in range(6):
        target.write_bytes(OLD)
        proc = start_merge(tmp_path, mode, "cli", paths, target)
        if mode == "named" and trial % 2 == 0:
            # Every other kill waits for the named temporary to appear, so some land while it exists whatever the
            # machine's speed (the random delays alone all missed it once, on a loaded CI machine).
            deadline = time.monotonic() + 30
            while not debris(target.parent) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(0.0, 0.15))
        proc.kill()
        proc.communicate(timeout=60)
        assert_whole(target, want)
        left += len(debris(target.parent))
        if mode == "unnamed":
            # An unnamed temporary dies with its process; one gets a name only in the commit's last moments
            # (linked, not yet renamed), so anything left then is the complete output.
            assert all(os.path.getsize(p) == size for p in debris(target.parent))
    if mode == "named":
        assert left, "no kill landed while a named temporary existed"
    # The next merge into the directory sweeps what dead processes left (not what live ones are writing).
    live = target.parent / f".x.safetensors.pysoup-tmp-{_host_tag()}-{os.getpid()}-0123abcd"
    live.write_bytes(b"a live process's temporary")
    pysoup.merge(paths[:2], target, strategy="ties", base=paths[2], progress=False)
    assert debris(target.parent) == [str(live)]
    assert assert_whole(target, want) == "new"


def _host_tag():
    from pysoup.io.temporary import _HOST

    return _HOST


def test_commit_holds_signals_until_renames_are_done(tmp_path, monkeypatch):
    """A SIGTERM raised between two renames of a directory output is delivered only after the last one."""
    import pysoup.io.temporary as temporary

    dirs = hf_inputs(tmp_path, tokenizer_bytes=10)
    out = tmp_path / "merged"
    real_replace = os.replace
    seen = []

    def replace_then_signal(a, b):
        real_replace(a, b)
        seen.append(b)
        if len(seen) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(temporary.os, "replace", replace_then_signal)
    got = []
    old = signal.signal(signal.SIGTERM, lambda s, f: got.append(len(seen)))
    try:
        pysoup.merge(dirs, out, shard_size="5KB", progress=False)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert got == [len(seen)] and len(seen) > 2  # delivered once, after every rename


# -- 13. a read-only output file system ----------------------------------------------------------------------------
def test_read_only_output_filesystem(tmp_path, tmpfs):
    a, b = (save_st(tmp_path / f"{n}.safetensors", small_model(seed=s)) for s, n in enumerate("ab"))
    fs = tmpfs("1m", ro=True)
    for out in (fs / "soup.safetensors", fs / "hfdir", fs / "new" / "soup.safetensors"):
        proc = run_cli("merge", a, b, "-o", out)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Read-only file system" in lines[0] and "pysoup-tmp" not in lines[0], lines
        with pytest.raises(OutputError, match="Read-only file system"):
            pysoup.merge([a, b], out, progress=False)
    assert os.listdir(fs) == []


# -- 14. directories the merge created are removed when it fails -----------------------------------------------
def test_created_directories_removed_on_failure(tmp_path, monkeypatch):
    a, b = (save_st(tmp_path / f"{n}.safetensors", small_model(seed=s)) for s, n in enumerate("ab"))
    restart = disk_full_after(monkeypatch)
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "new1" / "new2" / "soup.safetensors", tmp_path / "kept" / "new" / "hfdir"):
        restart()
        with pytest.raises(OutputError, match="No space left"):
            pysoup.merge([a, b], out, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors", "kept"]
    assert os.listdir(tmp_path / "kept") == []


def test_created_directories_removed_on_full_disk(tmp_path, tmpfs):
    sds = [small_model(seed=s, hidden=128) for s in range(2)]
    inputs = [save_st(tmp_path / f"big{i}.safetensors", sd) for i, sd in enumerate(sds)]
    fs = tmpfs("64k")
    proc = run_cli("merge", *inputs, "-o", fs / "new1" / "new2" / "soup.safetensors")
    assert proc.returncode == 1 and "No space left on device" in proc.stderr
    assert os.listdir(fs) == []


# -- 15. merges racing into one new directory --------------------------------------------------------------------
def test_concurrent_merges_into_one_new_directory(tmp_path):
    a, b = (save_st(tmp_path / f"{n}.safetensors", small_model(seed=s)) for s, n in enumerate("ab"))
    code = """
        import sys, time
        import pysoup
        start = float(sys.argv[1])
        time.sleep(max(0.0, start - time.time()))  # both processes create the directory at the same moment
        pysoup.merge(sys.argv[3:], sys.argv[2], progress=False)
    """
    want = pysoup.merge([a, b], progress=False)
    for trial in range(4):  # the deterministic form is test_make_directories_tolerates_a_concurrent_creator
        out = tmp_path / f"race{trial}" / "deeper" / ("soup.safetensors" if trial % 2 else "hfdir")
        start = time.time() + 0.4  # both started well before (python starts in ~0.1 s)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(code), str(start), str(out), a, b],
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            for _ in range(2)
        ]
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        with pysoup.open(str(out)) as got:
            assert all(torch.equal(got[k], v) for k, v in want.items())
        assert not debris(tmp_path)


def test_make_directories_tolerates_a_concurrent_creator(tmp_path, monkeypatch):
    """Deterministic form of the race: another process creates the directory between our check and mkdir."""
    import pysoup.io.writer as writer

    target = tmp_path / "x" / "y"
    real_mkdir = os.mkdir

    def racing_mkdir(path, *args):
        real_mkdir(path, *args)  # "the other process" wins...
        raise FileExistsError(errno.EEXIST, "File exists", path)  # ...and we see its directory

    monkeypatch.setattr(writer.os, "mkdir", racing_mkdir)
    assert writer._make_directories(str(target)) == []  # not ours: never removed by our cleanup
    assert target.is_dir()


# -- 16. an input without tensors --------------------------------------------------------------------------------
def test_empty_checkpoints_refused(tmp_path):
    a = save_st(tmp_path / "a.safetensors", small_model())
    d = tmp_path / "empty_index"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": {}}')
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    for bad in (d, empty):
        for inputs in ([bad, a], [a, bad]):
            with pytest.raises(PlanError, match="has no tensors"):
                pysoup.merge(inputs, tmp_path / "o.safetensors", progress=False)
        proc = run_cli("merge", bad, a, "-o", tmp_path / "o.safetensors")
        assert proc.returncode == 1 and "checkpoint has no tensors" in proc.stderr
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_deeply_nested_index_is_one_line(tmp_path):
    a = save_st(tmp_path / "a.safetensors", small_model())
    d = tmp_path / "deep"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 2000 + "]" * 2000 + "}")
    proc = run_cli("merge", a, d, "-o", tmp_path / "o.safetensors")
    assert proc.returncode == 1 and "index is nested too deeply" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# -- the temporaries themselves -----------------------------------------------------------------------------------
def test_stale_temporaries_of_dead_processes_only(tmp_path):
    from pysoup.io.temporary import remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        names = {
            "dead": f".a.safetensors.pysoup-tmp-{_host_tag()}-{dead.pid}-0badc0de",
            "live": f".a.safetensors.pysoup-tmp-{_host_tag()}-{sleeper.pid}-0badc0de",
            "other host": f".a.safetensors.pysoup-tmp-00000000-{dead.pid}-0badc0de",
            "not ours": ".a.safetensors.tmp-123",
        }
        for n in names.values():
            (tmp_path / n).write_bytes(b"x")
        assert remove_stale_temporaries(str(tmp_path)) == [names["dead"]]
        assert sorted(os.listdir(tmp_path)) == sorted(n for k, n in names.items() if k != "dead")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_output_file_mode_follows_umask(tmp_path):
    a, b = (save_st(tmp_path / f"{n}.safetensors", small_model(seed=s)) for s, n in enumerate("ab"))
    old = os.umask(0o027)
    try:
        pysoup.merge([a, b], tmp_path / "o.safetensors", progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "o.safetensors").st_mode) == 0o640


def test_fsync_before_rename(tmp_path, monkeypatch):
    """`durable=True` (the CLI's --fsync) fsyncs every output file before its rename and the directory after; a merge
    without it never fsyncs. (Checked to fail when durable is ignored, the directory is not synced, or the files are
    synced after their renames.)"""
    import pysoup.io.temporary as temporary
    import pysoup.io.writer as writer

    dirs = hf_inputs(tmp_path, tokenizer_bytes=10)
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(writer.os, "fsync", lambda fd: (events.append(("fsync", fd)), real_fsync(fd)))
    monkeypatch.setattr(temporary.os, "replace", lambda a, b: (events.append(("put", b)), real_replace(a, b)))
    out = tmp_path / "durable"
    report = pysoup.merge(dirs, out, shard_size="5KB", durable=True, progress=False)
    files = len(report.outputs) + 2  # + config.json and tokenizer.json
    kinds = [k for k, _ in events]
    assert kinds == ["fsync"] * files + ["put"] * files + ["fsync"], kinds
    events.clear()
    pysoup.merge(dirs, tmp_path / "fast", shard_size="5KB", progress=False)
    assert "fsync" not in [k for k, _ in events]
    # The CLI's --fsync is durable=True: one file, its fsync, its rename, the directory's fsync.
    from pysoup.cli import main

    events.clear()
    assert main(["merge", *dirs, "-o", str(tmp_path / "cli.safetensors"), "--fsync", "--no-progress"]) == 0
    assert [k for k, _ in events] == ["fsync", "put", "fsync"]
