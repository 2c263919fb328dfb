"""`pysoup merge | inspect | bench` — errors are one line on stderr and a non-zero exit (2 for usage,
1 for a merge that cannot be done); `--debug` shows the traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from pysoup.errors import SoupError


def _parse_value(text: str):
    """--param values: JSON when it parses (numbers, true/false, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        return text


def _parse_params(items) -> dict:
    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SoupError(f"--param {item!r}: expected KEY=VALUE")
        params[key.strip()] = _parse_value(value.strip())
    return params


def _parse_weights(text, inputs=None):
    if text is None:
        return None
    if text.startswith("mwa:"):
        return _mwa_weights(text, inputs)
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise SoupError(f"--weights {text!r}: expected numbers separated by commas, e.g. 0.5,0.3,0.2") from None


def _mwa_weights(text: str, inputs) -> list:
    """--weights mwa:loss,penalty=1 (or mwa:step): Metrics-Weighted Averaging over Hugging Face Trainer checkpoint
    folders, from their trainer_state.json; the weights go to stderr, one line per checkpoint."""
    from pysoup.search.weights import mwa, trainer_metrics

    mode, *options = text[len("mwa:") :].split(",")
    penalty = 1.0
    for option in options:
        key, sep, value = option.partition("=")
        try:
            if key.strip() != "penalty" or not sep:
                raise ValueError
            penalty = float(value)
        except ValueError:
            raise SoupError(f"--weights {text!r}: expected mwa:loss or mwa:step, then optionally ,penalty=P") from None
    if mode not in ("loss", "step"):
        raise SoupError(f"--weights {text!r}: expected mwa:loss or mwa:step, then optionally ,penalty=P")
    if not inputs:
        raise SoupError("--weights mwa:... needs Trainer checkpoint folders on the command line (run/checkpoint-*)")
    rows = trainer_metrics(inputs)
    weights = mwa([r[mode] for r in rows], mode=mode, penalty=penalty)
    print(f"mwa weights ({mode}, penalty={penalty:g}):", file=sys.stderr)
    for r, w in zip(rows, weights):
        print(f"  {r['path']}: step {r['step']}, loss {r['loss']:.6g} -> weight {w:.6f}", file=sys.stderr)
    return weights


def build_parser() -> argparse.ArgumentParser:
    from pysoup._version import __version__

    p = argparse.ArgumentParser(prog="pysoup", description="Merge neural-network checkpoints, fast.")
    p.add_argument("--version", action="version", version=f"pysoup {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge checkpoints into one")
    m.add_argument("inputs", nargs="*", metavar="IN", help="safetensors files or Hugging Face model directories")
    m.add_argument(
        "--config",
        help="a mergekit 0.1.5 YAML config (models or slices, merge_method, base_model, parameters, dtype, tokenizer, "
        "chat_template); a directory output also gets its config.json and tokenizer",
    )
    m.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="OUT.safetensors for one file, else a directory (sharded like Hugging Face)",
    )
    m.add_argument(
        "--strategy",
        default="linear",
        help="linear, uniform, task_arithmetic, ties, dare_linear, "
        "dare_ties, slerp, model_stock, sparse, variance_corrected, interpolate",
    )
    m.add_argument(
        "--weights",
        help="one weight per input, comma-separated: 0.5,0.3,0.2; or mwa:loss,penalty=1 / mwa:step,penalty=P over "
        "Hugging Face Trainer checkpoint folders (Metrics-Weighted Averaging from their trainer_state.json)",
    )
    m.add_argument("--base", help="base model, for methods that use one")
    m.add_argument("--param", action="append", metavar="KEY=VALUE", help="strategy parameter (repeatable)")
    m.add_argument("--dtype", help="output dtype: bfloat16, float16 or float32 (default: the first input's)")
    m.add_argument("--threads", type=int, help="CPU threads for the kernels (default: every core this process may use)")
    m.add_argument("--shard-size", help="max bytes per shard for directory outputs: 400KB, 5GB, 5GiB")
    m.add_argument(
        "--backend",
        default="auto",
        help="cpu (C++ kernels), reference (torch, the definition) or triton (with --device); default auto",
    )
    m.add_argument("--device", help="merge on a GPU: cuda, cuda:1 (default: the CPU)")
    m.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run on a Ray cluster, one task per output shard: HOST:PORT, ray://HOST:PORT or auto (no ADDRESS: "
        "RAY_ADDRESS, else a local one); inputs and output on storage every node sees",
    )
    m.add_argument("--task-size", help="--ray: output bytes per task (default: one task per shard): 2GB, 512MiB")
    m.add_argument("--task-cpus", type=int, help="--ray: CPUs (kernel threads) each task declares (default 1)")
    m.add_argument(
        "--plan",
        action="store_true",
        help="dry run: bytes per input and output shard, tasks, peak memory, time estimate; reads headers only",
    )
    m.add_argument("--workers", type=int, help="--plan --ray: tasks running at once, for the time estimate")
    m.add_argument("--read-gbps", type=float, help="--plan: the inputs' storage read bandwidth (GB/s), if slower")
    m.add_argument("--calibrate", action="store_true", help="--plan: time the method here, now, on synthetic inputs")
    m.add_argument("--fsync", action="store_true", help="fsync the output before renaming it into place")
    m.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    m.add_argument("--json", action="store_true", help="print the report as JSON")
    m.add_argument(
        "--lora",
        action="append",
        metavar="ADAPTER",
        help="fold a PEFT LoRA adapter directory into the one input model, out of core (repeatable): "
        "W + sum w_i s_i B_i A_i",
    )
    m.add_argument("--lora-weights", help="one weight per --lora adapter, comma-separated (default 1 each)")
    m.add_argument(
        "--lora-mode",
        choices=["delta", "factors"],
        help="the inputs are LoRA adapters: delta (exact sum of their updates) or factors (A and B separately)",
    )
    m.add_argument(
        "--lora-rank", type=int, help="delta mode: the merged adapter's rank by truncated SVD (default: concat)"
    )
    m.add_argument("--debug", action="store_true", help="show tracebacks")

    x = sub.add_parser("extract-lora", help="extract a LoRA adapter from a fine-tuned model and its base (SVD)")
    x.add_argument("finetuned", help="the fine-tuned model (safetensors file or Hugging Face directory)")
    x.add_argument("base", help="its base model")
    x.add_argument("-o", "--output", required=True, metavar="ADAPTER", help="the adapter directory to write")
    x.add_argument("--rank", type=int, required=True, help="rank per module (at most min(rows, cols))")
    x.add_argument("--modules", help="module-name suffixes to extract, comma-separated (default: every 2-D weight)")
    x.add_argument("--dtype", help="the factors' dtype (default: the fine-tuned weights')")
    x.add_argument(
        "--fan-in-fan-out",
        action="store_true",
        default=None,
        help="linear weights are stored [in, out] (Conv1D); default: from config.json's model_type (GPT-2 family)",
    )
    x.add_argument("--json", action="store_true", help="print the report as JSON")
    x.add_argument("--debug", action="store_true", help="show tracebacks")

    i = sub.add_parser("inspect", help="list a checkpoint's tensors")
    i.add_argument("path")
    i.add_argument("--debug", action="store_true")

    n = sub.add_parser("info", help="what this installation can do: version, backends, CPU ISAs, threads")
    n.add_argument("--json", action="store_true", help="print pysoup.info() as JSON")
    n.add_argument("--debug", action="store_true")

    b = sub.add_parser(
        "bench",
        help="run a benchmark suite: prints the table, writes SUITE.json, SUITE.md and SUITE.png into --out",
    )
    b.add_argument("--quick", action="store_true", help="one small case, torch and mergekit timed once (seconds)")
    b.add_argument(
        "--suite",
        choices=["linear", "methods", "headers"],
        default="linear",
        help="linear: N inputs x sizes (default); methods: every merge method on base + 3 inputs; headers: files "
        "of 10^5 and 10^6 tiny tensors",
    )
    b.add_argument("--out", metavar="DIR", help="results folder (default: a new ./pysoup-bench-<timestamp>)")
    b.add_argument("--force", action="store_true", help="overwrite earlier results of this suite in --out")
    b.add_argument("--cases", help="comma-separated cases instead of the suite's: 4x512MiB,2x1GiB (headers: 1e5)")
    b.add_argument("--runs", type=int, help="timed runs per contender (default 5; quick runs 3)")
    b.add_argument("--no-mergekit", action="store_true", help="leave mergekit out even when it is installed")
    b.add_argument("--debug", action="store_true")
    b.set_defaults(bench_parser=b)
    return p


def _merge_arguments(args) -> dict:
    """pysoup.merge's arguments from the command line, or from --config with command-line overrides."""
    params = _parse_params(args.param)
    weights = _parse_weights(args.weights, args.inputs)
    if not args.config:
        if not args.inputs:
            raise SoupError("merge needs input checkpoints (or --config FILE)")
        return dict(
            inputs=args.inputs, strategy=args.strategy, weights=weights, base=args.base, params=params, dtype=args.dtype
        )
    if args.inputs:
        raise SoupError("give the inputs either on the command line or in --config, not both")
    # A config may stack slices of several models: pysoup.mergekit runs it (see _cmd_merge).
    return dict(config=args.config, base=args.base, weights=weights, params=params, dtype=args.dtype)


def _cmd_merge(args) -> int:
    import pysoup

    if (args.plan or args.ray is not None) and (args.lora or args.lora_mode or _adapter_inputs(args)):
        raise SoupError("--plan and --ray take merges of checkpoints; LoRA folds and adapter merges run locally")
    if args.lora or args.lora_weights or args.lora_mode or args.lora_rank is not None or _adapter_inputs(args):
        return _cmd_lora_merge(args)

    arguments = _merge_arguments(args)
    if "config" in arguments:
        from pysoup.mergekit.run import merge_config

        run = merge_config
    else:
        run = pysoup.merge
    ray = _ray_arguments(args, "config" in arguments)
    if args.plan:
        return _cmd_plan(args, arguments, ray)
    report = run(
        **ray,
        out=args.output,
        backend=args.backend,
        device=args.device,
        threads=args.threads,
        shard_size=args.shard_size,
        progress=False if args.no_progress else None,
        durable=args.fsync,
        **arguments,
    )
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(report), indent=2))
    else:
        from pysoup.io.units import format_bytes

        print(f"merged {report.tensors} tensors ({report.strategy}) -> {', '.join(report.outputs)}")
        for note in report.notes:
            print(note)
        print(
            f"read {format_bytes(report.bytes_read)}, wrote {format_bytes(report.bytes_written)} in "
            f"{report.seconds:.2f} s; peak RSS {format_bytes(report.peak_rss_bytes)}; "
            f"backend {report.backend}{'/' + report.cpu_isa if report.cpu_isa else ''}"
            + (f" on {report.device}" if report.backend == "triton" else f", {report.threads} threads")
        )
    return 0


def _ray_arguments(args, config: bool) -> dict:
    """{"executor": a RayExecutor} for --ray (and its --task-size, --task-cpus), else {}."""
    if (args.read_gbps is not None or args.calibrate) and not args.plan:
        raise SoupError("--read-gbps and --calibrate go with --plan")
    if args.ray is None:
        for flag, given in (("--task-size", args.task_size), ("--task-cpus", args.task_cpus)):
            if given:
                raise SoupError(f"{flag} goes with --ray")
        if args.workers and not args.plan:
            raise SoupError("--workers goes with --plan --ray")
        return {}
    if config:
        raise SoupError("--ray runs merges of input checkpoints; a --config merge runs locally")
    if args.device:
        raise SoupError("--ray runs the CPU kernels in its tasks: --device does not apply")
    from pysoup.distributed import RayExecutor

    return {"executor": RayExecutor(args.ray or None, task_size=args.task_size, num_cpus=args.task_cpus or 1)}


def _cmd_plan(args, arguments, ray) -> int:
    """merge --plan: the dry run, printed (or as JSON)."""
    import pysoup

    if "config" in arguments:
        raise SoupError("--plan takes input checkpoints; a --config merge has no dry run yet")
    estimate = pysoup.plan(
        out=args.output,
        threads=args.threads,
        shard_size=args.shard_size,
        workers=args.workers,
        read_gbps=args.read_gbps,
        calibrate=args.calibrate,
        **ray,
        **arguments,
    )
    print(json.dumps(estimate.as_dict(), indent=2) if args.json else estimate.format())
    return 0


def _adapter_inputs(args) -> bool:
    from pysoup.lora.adapter import is_adapter_dir

    return any(is_adapter_dir(p) for p in args.inputs)


def _cmd_lora_merge(args) -> int:
    """merge with --lora (fold adapters into the one input model) or with adapter inputs (--lora-mode)."""
    import pysoup.lora

    if args.config:
        raise SoupError("--lora options and --config do not mix (a config states model+lora itself)")
    for flag, given in (("--base", args.base), ("--device", args.device)):
        if given:
            raise SoupError(f"{flag} does not apply to LoRA merges")
    if args.threads is not None and not args.lora:
        raise SoupError("--threads applies to folding (--lora), not to adapter merges")
    if args.lora:
        if args.lora_mode or args.lora_rank is not None:
            raise SoupError("--lora folds adapters into a model; --lora-mode/--lora-rank merge adapter inputs")
        if len(args.inputs) != 1:
            raise SoupError(f"--lora folds adapters into one base model, got {len(args.inputs)} inputs")
        if args.weights or args.param or args.dtype or args.strategy != "linear":
            raise SoupError(
                "folding takes --lora-weights (one per adapter); --weights/--param/--dtype/--strategy are for merges"
            )
        report = pysoup.lora.fold(
            args.inputs[0], args.lora, args.output, weights=_parse_weights(args.lora_weights),
            shard_size=args.shard_size, durable=args.fsync, threads=args.threads,
        )  # fmt: skip
        summary = f"folded {len(args.lora)} adapter(s) into {len(report.folded)} weights -> {', '.join(report.outputs)}"
    else:
        if args.lora_weights:
            raise SoupError("--lora-weights goes with --lora; adapter merges take --weights")
        if args.shard_size:
            raise SoupError("an adapter merge writes one adapter_model.safetensors: --shard-size does not apply")
        import pysoup

        report = pysoup.merge(
            args.inputs, args.output, strategy=args.strategy, weights=_parse_weights(args.weights, args.inputs),
            params=_parse_params(args.param), dtype=args.dtype, backend=args.backend, lora=args.lora_mode,
            lora_rank=args.lora_rank,
        )  # fmt: skip
        summary = f"merged {len(args.inputs)} adapters ({args.lora_mode}, {report.strategy}) -> {report.outputs[0]}"
    _print_lora_report(args, report, summary)
    return 0


def _print_lora_report(args, report, summary: str) -> None:
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(report), indent=2))
        return
    from pysoup.io.units import format_bytes

    print(summary)
    for note in getattr(report, "notes", []):
        print(note)
    print(f"{report.seconds:.2f} s; peak RSS {format_bytes(report.peak_rss_bytes)}")


def _cmd_extract_lora(args) -> int:
    import pysoup.lora

    if args.rest:
        raise SoupError(f"unrecognized arguments: {' '.join(args.rest)}")
    modules = [m for m in args.modules.split(",") if m] if args.modules else None
    report = pysoup.lora.extract_lora(
        args.finetuned,
        args.base,
        args.output,
        rank=args.rank,
        modules=modules,
        dtype=args.dtype,
        fan_in_fan_out=args.fan_in_fan_out,
    )
    summary = f"extracted {len(report.ranks)} modules (rank <= {args.rank}) -> {report.outputs[0]}"
    if report.modules_to_save:
        summary += f"; modules_to_save: {', '.join(report.modules_to_save)}"
    _print_lora_report(args, report, summary)
    return 0


def _cmd_inspect(args) -> int:
    import pysoup
    from pysoup.io.units import format_bytes

    with pysoup.open(args.path) as ckpt:
        width = max((len(k) for k in ckpt.infos), default=4)
        total = 0
        counts: dict = {}
        for name, t in ckpt.infos.items():
            print(f"{name:<{width}}  {t.dtype:<7} {str(list(t.shape)):<20} {format_bytes(t.nbytes):>10}")
            total += t.nbytes
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
        if ckpt.metadata:
            print(f"metadata: {json.dumps(ckpt.metadata)}")
        params = sum(counts.values())
        by_dtype = ", ".join(f"{d} {n:,}" for d, n in sorted(counts.items()))
        print(
            f"{len(ckpt.infos)} tensors, {params:,} parameters ({by_dtype}), {format_bytes(total)} in "
            f"{len(ckpt.files)} file(s)"
        )
    return 0


def _cmd_info(args) -> int:
    import pysoup

    info = pysoup.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"pysoup {info['version']}")
    print(f"backends: {', '.join(info['backends'])}")
    isas = info["cpu_isas"] or ["none (the C++ module did not load)"]
    print(f"CPU ISA: {info['cpu_isa']} (usable: {', '.join(isas)}; PYSOUP_CPU_ISA forces one)")
    print(f"threads: {info['threads']}")
    return 0


def _cmd_bench(args) -> int:
    if args.rest:
        args.bench_parser.error(f"unrecognized arguments: {' '.join(args.rest)}")
    if args.runs is not None and args.runs < 1:
        args.bench_parser.error("--runs must be at least 1")
    import pysoup.bench

    shown = [("--quick", args.quick), (f"--suite {args.suite}", args.suite != "linear")]
    shown += [
        (f"--cases {args.cases}", args.cases),
        (f"--runs {args.runs}", args.runs),
        ("--no-mergekit", args.no_mergekit),
    ]
    pysoup.bench.run(
        args.suite,
        args.out,
        quick=args.quick,
        cases=[c for c in args.cases.split(",") if c] if args.cases else None,
        runs=args.runs,
        mergekit=not args.no_mergekit,
        force=args.force,
        command=" ".join(["pysoup bench"] + [flag for flag, given in shown if given]),
    )
    return 0


def main(argv=None) -> int:
    # OpenMP workers that wait between parallel regions sleep instead of spinning (libgomp reads this when the C++
    # module loads, which the CLI has not done yet): a merge runs a kernel per chunk with I/O, page faults and Python
    # in between, and on few cores a spinning worker takes the core the writer thread needs (ramplus_tl, base + 3 x
    # 512 MiB, 2 cores: ~1.2 CPU s less). An OMP_WAIT_POLICY the user set is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from pysoup.io.signals import Terminated, die_by, raise_on_termination

    raise_on_termination()  # SIGTERM and SIGHUP clean up like Ctrl-C, then end the process
    try:
        return _run(argv)
    except Terminated as exc:
        print(f"pysoup: {exc}; nothing was written", file=sys.stderr)
        sys.stderr.flush()
        die_by(exc.signum)
        raise


def _run(argv) -> int:
    parser = build_parser()
    # `pysoup bench` passes any further options on to benchmarks/run.py (--cases, --runs, --suite ...).
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.rest = extra

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"pysoup: warning: {message}", file=sys.stderr)

    warnings.showwarning = show_warning
    try:
        commands = {"merge": _cmd_merge, "inspect": _cmd_inspect, "info": _cmd_info, "bench": _cmd_bench}
        commands["extract-lora"] = _cmd_extract_lora
        return commands[args.command](args)
    except (SoupError, ValueError, KeyError, OSError) as exc:
        if args.debug:
            raise
        msg = str(exc).replace("\n", " ")
        print(f"pysoup: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pysoup: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
