"""LoRA adapters: folding a rank-64 adapter on every linear module into a 1 GiB bf16 model, and merging 8 adapters.

The model is a Llama of 0.54 B parameters in bf16 (hidden 2048, MLP 5632, 8 layers, 16 heads, vocabulary 32000,
untied head: 1.01 GiB), written as a Hugging Face directory of random bf16 values; the adapters are rank 64,
alpha 128, fp32, on q/k/v/o/gate/up/down of every layer (PEFT's layout and adapter_config.json; 80 MiB each).
Every contender is a whole process timed by pysoup.bench.harness, which reports the process's own peak RSS:

Fold (one adapter into the model):
  - pysoup: `pysoup merge BASE --lora ADAPTER -o OUT` (streamed: one fused fold kernel call per row block and thread);
  - io_floor: pysoup/bench/baselines.py's floor: read the base and the adapter once, write the base's size;
  - peft: what users run today: transformers' from_pretrained (bf16), PeftModel.from_pretrained,
    merge_and_unload(), save_pretrained.
Adapter merges (8 adapters, weights 1/8):
  - pysoup delta concat (exact, rank 512), pysoup delta svd rank 64 (exact SVD through thin QRs, truncated),
    pysoup factors (A's and B's averaged, the MWA way);
  - peft_cat: PEFT's add_weighted_adapter(combination_type="cat") (its exact type) and save_pretrained of the new
    adapter; it loads the base model first (PEFT merges adapters only on a model).

Targets (the fold): whole process <= 1.5x the I/O floor; peak RSS <= 256 MiB. Files under /dev/shm when it has
room; the load average during the runs is recorded (on a shared machine, wall times carry other work's load).

    python benchmarks/lora.py [--quick] [--fold-only] [--runs 3] [--bytecode cached|env] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

FULL = {"hidden": 2048, "mlp": 5632, "layers": 8, "heads": 16, "vocab": 32000, "rank": 64, "adapters": 8, "runs": 3}
QUICK = {"hidden": 256, "mlp": 704, "layers": 2, "heads": 4, "vocab": 1000, "rank": 8, "adapters": 3, "runs": 1}
RSS_TARGET = 256 << 20
FLOOR_TARGET = 1.5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shapes(cfg: dict) -> dict:
    """{name: shape} of LlamaForCausalLM's state dict for cfg."""
    h, m, v = cfg["hidden"], cfg["mlp"], cfg["vocab"]
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(cfg["layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{name}.weight"] = (h, h)
        out[p + "mlp.gate_proj.weight"] = (m, h)
        out[p + "mlp.up_proj.weight"] = (m, h)
        out[p + "mlp.down_proj.weight"] = (h, m)
    return out


def write_base(directory: str, cfg: dict) -> str:
    """The model as a Hugging Face directory: config.json by transformers, random bf16 weights (|x| in
    [2^-8, 2^-5), random signs; norms 1.0)."""
    import numpy as np
    from transformers import LlamaConfig

    from pysoup.io.writer import write_arrays

    config = LlamaConfig(
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["mlp"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["heads"],
        vocab_size=cfg["vocab"],
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    rng = np.random.default_rng(0)
    arrays = {}
    for name, shape in shapes(cfg).items():
        if len(shape) == 1:
            arrays[name] = np.full(shape, 0x3F80, dtype=np.uint16)  # 1.0
            continue
        bits = rng.integers(0x3B80, 0x3D00, size=shape, dtype=np.uint16)
        bits |= (rng.integers(0, 2, size=shape, dtype=np.uint16) << 15).astype(np.uint16)
        arrays[name] = bits
    path = os.path.join(directory, "base")
    write_arrays(path, arrays, dict.fromkeys(arrays, "BF16"))
    config.save_pretrained(path)
    return path


def write_adapter(directory: str, cfg: dict, seed: int) -> str:
    """A PEFT adapter directory: adapter_config.json by peft's LoraConfig, fp32 factors (A ~ U(±1/√in) as PEFT's
    kaiming init, B ~ N(0, 0.01): a trained-looking update)."""
    import numpy as np
    from peft import LoraConfig

    from pysoup.io.writer import write_arrays

    r = cfg["rank"]
    rng = np.random.default_rng(100 + seed)
    arrays = {}
    for name, shape in shapes(cfg).items():
        module = name[: -len(".weight")]
        if len(shape) != 2 or module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        out_f, in_f = shape
        bound = 1 / in_f**0.5
        arrays[f"base_model.model.{module}.lora_A.weight"] = rng.uniform(-bound, bound, (r, in_f)).astype(np.float32)
        arrays[f"base_model.model.{module}.lora_B.weight"] = (rng.standard_normal((out_f, r)) * 0.01).astype(np.float32)
    path = os.path.join(directory, f"adapter{seed}")
    write_arrays(path, arrays, dict.fromkeys(arrays, "F32"), weights_name="adapter_model.safetensors")
    LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="CAUSAL_LM").save_pretrained(path)
    return path


# -- contenders run as `python lora.py _<name> ARGS...` ------------------------------------------------------------


def run_peft_fold(base: str, adapter: str, out: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)


def run_peft_cat(base: str, out: str, *adapters: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    names = ["a0"]
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
        names.append(f"a{i}")
    model.add_weighted_adapter(names, [1 / len(names)] * len(names), "merged", combination_type="cat")
    for name in names:
        model.delete_adapter(name)
    model.save_pretrained(out, selected_adapters=["merged"])


def run_pysoup_merge(mode: str, out: str, *adapters: str) -> None:
    from pysoup.lora import merge_adapters

    kind, _, rank = mode.partition(":")
    if kind == "factors":
        merge_adapters(list(adapters), out, mode="factors")
    else:
        refactor = "svd" if rank else "concat"
        merge_adapters(list(adapters), out, mode="delta", refactor=refactor, rank=int(rank) if rank else None)


# -- the suite ----------------------------------------------------------------------------------------------------


def contender_env(bytecode: str):
    """The contenders' environment. "cached": pysoup's modules byte-compiled first (into its __pycache__
    directories, which git ignores) and PYTHONDONTWRITEBYTECODE dropped, so every run imports them as an installed
    pysoup does (pip compiles a package's modules when it installs it; the other contenders' packages in
    site-packages were compiled so). "env": this environment as it is (where PYTHONDONTWRITEBYTECODE is set, as in
    some sandboxes, an editable pysoup compiles its ~25 modules of the fold's path on every run: ~0.1 s)."""
    if bytecode == "env":
        return None
    from pysoup.bench.harness import as_installed

    return as_installed(dict(os.environ))


def measure(cfg: dict, work: str, suites_wanted=("fold", "merge8"), bytecode: str = "cached") -> dict:
    from pysoup.bench import baselines
    from pysoup.bench.harness import raise_on_failure, rotated, run_process, summarize, sync, warm_page_cache

    base = write_base(work, cfg)
    adapters = [write_adapter(work, cfg, i) for i in range(cfg["adapters"])]
    base_file = os.path.join(base, "model.safetensors")
    ad_file = os.path.join(adapters[0], "adapter_model.safetensors")
    base_bytes, ad_bytes = os.path.getsize(base_file), os.path.getsize(ad_file)
    me = os.path.abspath(__file__)
    py = sys.executable
    fold = {
        "pysoup": [py, "-m", "pysoup", "merge", base, "--lora", adapters[0], "-o", os.path.join(work, "fold_pysoup"),
                   "--no-progress"],
        "io_floor": baselines.command("io_floor", os.path.join(work, "floor.safetensors"), base_file, ad_file),
        "peft": [py, me, "_peft_fold", base, adapters[0], os.path.join(work, "fold_peft")],
    }  # fmt: skip
    merges = {
        "pysoup_delta_concat": [py, me, "_pysoup_merge", "delta", os.path.join(work, "m_concat"), *adapters],
        "pysoup_delta_svd64": [py, me, "_pysoup_merge", "delta:64", os.path.join(work, "m_svd"), *adapters],
        "pysoup_factors": [py, me, "_pysoup_merge", "factors", os.path.join(work, "m_factors"), *adapters],
        "peft_cat": [py, me, "_peft_cat", base, os.path.join(work, "m_peft"), *adapters],
    }
    warm_page_cache([base_file] + [os.path.join(a, "adapter_model.safetensors") for a in adapters])
    env = contender_env(bytecode)
    load = [os.getloadavg()[0]]
    suites = {}
    for suite, commands in (("fold", fold), ("merge8", merges)):
        if suite not in suites_wanted:
            continue
        times = {n: [] for n in commands}
        cpu = {n: [] for n in commands}
        rss = {n: [] for n in commands}
        for r in range(cfg["runs"]):
            for name in rotated(list(commands), r):
                sync()
                before = _children_cpu()
                res = run_process(commands[name], cwd=ROOT, env=env)
                raise_on_failure(res, name, suite)
                cpu[name].append(_children_cpu() - before)  # the launcher's and the command's user + system time
                times[name].append(res["seconds"])
                rss[name].append(res["peak_rss_bytes"])
                load.append(os.getloadavg()[0])
        suites[suite] = {
            n: {
                "seconds": summarize(times[n]),
                "cpu_seconds": statistics.median(cpu[n]),
                "peak_rss_bytes": max(rss[n]),
                "runs": times[n],
            }
            for n in commands
        }
    check = _check_fold(work)
    floor = suites["fold"]["io_floor"]["seconds"]["median"]
    ratio = suites["fold"]["pysoup"]["seconds"]["median"] / floor
    peak = suites["fold"]["pysoup"]["peak_rss_bytes"]
    return {
        "case": f"Llama {cfg['hidden']}x{cfg['layers']} layers bf16, rank-{cfg['rank']} adapters on "
        f"{', '.join(TARGETS)}",
        "config": cfg,
        "base_bytes": base_bytes,
        "adapter_bytes": ad_bytes,
        "suites": suites,
        "fold_vs_peft_max_abs_diff": check,
        "targets": {
            "peak_rss": {"value_mib": peak / 2**20, "target_mib": RSS_TARGET / 2**20, "pass": peak <= RSS_TARGET},
            "time_vs_floor": {"value": ratio, "target": FLOOR_TARGET, "pass": ratio <= FLOOR_TARGET},
        },
        "load_average": {"min": min(load), "median": statistics.median(load), "max": max(load)},
        "bytecode": bytecode,
        "cores": len(os.sched_getaffinity(0)),
    }


def _no_bytecode() -> bool:
    return bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _check_fold(work: str) -> dict:
    """The largest |pysoup - peft| of the folded models and how many bf16 values differ (PEFT rounds ΔW to bf16
    before adding it in bf16; pysoup adds in fp32 and rounds once)."""
    import numpy as np

    import pysoup

    worst, differ, total = 0.0, 0, 0
    peft_dir = os.path.join(work, "fold_peft")
    with pysoup.open(os.path.join(work, "fold_pysoup")) as a, pysoup.open(peft_dir) as b:
        for name in a.keys():
            x = (a.numpy(name).astype(np.uint32) << 16).view(np.float32)
            y = (b.numpy(name).astype(np.uint32) << 16).view(np.float32)
            worst = max(worst, float(np.max(np.abs(x - y))))
            differ += int(np.count_nonzero(x != y))
            total += x.size
    return {"max_abs_diff": worst, "values_differing": differ, "values": total}


def markdown(report: dict) -> str:
    from pysoup.bench.harness import machine_line

    m = report["measurement"]
    lines = [
        "# pysoup benchmarks: LoRA adapters",
        "",
        f"Machine: {machine_line(report['machine'])}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Case: {m['case']}. Base model {m['base_bytes'] / 2**30:.2f} GiB (bf16), one adapter "
        f"{m['adapter_bytes'] / 2**20:.0f} MiB (fp32). Files on {report['scratch']}, warm page cache; contenders "
        f"rotated each round; median of {m['config']['runs']} runs (spread = (max - min) / median; CPU seconds: user + "
        "system of the whole process, median). Every time is a whole process (interpreter start and imports "
        "included)"
        + (
            "; pysoup's modules byte-compiled beforehand, as pip install leaves them (`--bytecode cached`)."
            if m.get("bytecode", "cached") == "cached"
            else "; bytecode as this environment has it (`--bytecode env`"
            + (", PYTHONDONTWRITEBYTECODE set: pysoup compiled its modules in every run)." if _no_bytecode() else ").")
        ),
        "",
        f"Load average during the runs ({m['cores']} cores; the benchmark's own processes count in it): "
        f"{m['load_average']['min']:.1f} to {m['load_average']['max']:.1f} (median {m['load_average']['median']:.1f}).",
        "",
        "## Fold one adapter into the model",
        "",
        "| contender | seconds (median) | spread | CPU seconds | peak RSS | vs the I/O floor | CPU vs the floor's |",
        "|---|---|---|---|---|---|---|",
    ]
    floor = m["suites"]["fold"]["io_floor"]["seconds"]["median"]
    floor_cpu = m["suites"]["fold"]["io_floor"]["cpu_seconds"]
    for name, r in m["suites"]["fold"].items():
        s = r["seconds"]
        lines.append(
            f"| {name} | {s['median']:.2f} | {s['spread']:.0%} | {r['cpu_seconds']:.1f} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} MiB | {s['median'] / floor:.2f}x | "
            f"{r['cpu_seconds'] / floor_cpu:.2f}x |"
        )
    t = m["targets"]
    c = m["fold_vs_peft_max_abs_diff"]
    lines += [
        "",
        f"Targets (pysoup): time {t['time_vs_floor']['value']:.2f}x the I/O floor <= {t['time_vs_floor']['target']}x: "
        f"**{'PASS' if t['time_vs_floor']['pass'] else 'FAIL'}**; peak RSS {t['peak_rss']['value_mib']:.0f} MiB <= "
        f"{t['peak_rss']['target_mib']:.0f} MiB: **{'PASS' if t['peak_rss']['pass'] else 'FAIL'}**.",
        "",
        f"pysoup's folded model and PEFT's are the same: all {c['values']:,} bf16 values equal."
        if c["values_differing"] == 0
        else f"pysoup's folded model and PEFT's differ in {c['values_differing']:,} of {c['values']:,} bf16 values, by "
        f"at most {c['max_abs_diff']:.3g}: PEFT rounds ΔW to bf16 and adds in bf16 (two roundings), pysoup adds in "
        "fp32 and rounds once.",
    ]
    if "merge8" not in m["suites"]:  # --fold-only
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"## Merge {m['config']['adapters']} adapters (weights 1/{m['config']['adapters']})",
        "",
        "| contender | seconds (median) | spread | CPU seconds | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for name, r in m["suites"]["merge8"].items():
        s = r["seconds"]
        lines.append(
            f"| {name} | {s['median']:.2f} | {s['spread']:.0%} | {r['cpu_seconds']:.1f} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} MiB |"
        )
    lines += [
        "",
        "peft_cat loads the base model (PEFT merges adapters on a model); pysoup reads the adapters alone. PEFT's "
        "SVD types were not run: they take a full SVD of every module's ΔW.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model and 3 adapters, one run (a smoke test)")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--out", help="where lora.{json,md} go (default: benchmarks/results; --quick: printed only)")
    parser.add_argument(
        "--bytecode",
        choices=("cached", "env"),
        default="cached",
        help="cached (default): pysoup's modules byte-compiled before the runs, as pip install leaves them; env: "
        "this environment as it is (PYTHONDONTWRITEBYTECODE, if set, makes an editable pysoup compile every run)",
    )
    parser.add_argument(
        "--fold-only",
        action="store_true",
        help="the fold suite alone (pysoup, the I/O floor, PEFT), printed only unless --out is given",
    )
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.runs is not None:
        cfg["runs"] = args.runs

    from pysoup.bench.harness import machine, work_dir

    size = sum(2 * int(__import__("math").prod(s)) for s in shapes(cfg).values())
    with work_dir(4 * size + (1 << 30)) as work:
        scratch = os.path.dirname(work)
        m = measure(cfg, work, ("fold",) if args.fold_only else ("fold", "merge8"), args.bytecode)
    report = {
        "suite": "lora",
        "machine": machine(),
        "command": "python benchmarks/lora.py" + (" --quick" if args.quick else "")
        + (" --fold-only" if args.fold_only else "") + (f" --runs {args.runs}" if args.runs is not None else "")
        + (" --bytecode env" if args.bytecode == "env" else ""),
        "scratch": scratch,
        "measurement": m,
    }  # fmt: skip
    text = markdown(report)
    out = args.out or (None if args.quick or args.fold_only else os.path.join(HERE, "results"))
    if out is not None:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "lora.json"), "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        with open(os.path.join(out, "lora.md"), "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    commands = {"_peft_fold": run_peft_fold, "_peft_cat": run_peft_cat, "_pysoup_merge": run_pysoup_merge}
    if len(sys.argv) > 1 and sys.argv[1] in commands:
        commands[sys.argv[1]](*sys.argv[2:])
    else:
        sys.exit(main())
