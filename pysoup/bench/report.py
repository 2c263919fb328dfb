"""What a suite's results look like: the console table, the markdown file, the JSON file, the PNG chart (when
matplotlib is installed)."""

from __future__ import annotations

import importlib.util
import json
import os

MANY_TENSORS = "many tensors"
EXTENSIONS = (".json", ".md", ".png")


# -- console -----------------------------------------------------------------------------------------------------

_MERGE_COLUMNS = (
    f"  {'case':<28} {'contender':<12} {'seconds':>8} {'spread':>7} {'runs':>4} {'GB/s':>7} {'peak RSS':>10}"
)
_HEADERS_COLUMNS = (
    f"  {'tensors':>10} {'contender':<13} {'call s':>8} {'process s':>10} {'spread':>7} {'runs':>4} {'peak RSS':>10}"
)


def table_header(suite: str) -> str:
    """The console table's column line."""
    return _HEADERS_COLUMNS if suite == MANY_TENSORS else _MERGE_COLUMNS


def table_rows(case: dict) -> list:
    """One console line per contender of a case's result."""
    rows = []
    for name, c in case["contenders"].items():
        s, rss = c["seconds"], f"{c['peak_rss_bytes'] / 2**20:.0f} MiB"
        if "tensors" in case:
            call = f"{c['call_seconds']['median']:8.3f}" if "call_seconds" in c else " " * 8
            rows.append(
                f"  {case['tensors']:>10,} {name:<13} {call} {s['median']:10.3f} {s['spread']:>7.0%} {s['n']:>4} "
                f"{rss:>10}"
            )
        else:
            rows.append(
                f"  {case['case']:<28} {name:<12} {s['median']:8.3f} {s['spread']:>7.0%} {s['n']:>4} "
                f"{c['gb_per_s']:7.2f} {rss:>10}"
            )
    return rows


# -- markdown ----------------------------------------------------------------------------------------------------


def markdown_head(report: dict) -> list:
    """The lines every results file starts with: the suite, the machine, the command that made it."""
    return [
        f"# pysoup benchmarks: {report['suite']}",
        "",
        f"Machine: {report['machine_line']}",
        "",
        f"Command: `{report['command']}`",
        "",
    ]


def markdown(report: dict) -> str:
    """The results file of any suite."""
    if report["suite"] == MANY_TENSORS:
        return _many_tensors_markdown(report)
    return _merge_markdown(report)


def _targets(report: dict) -> list:
    lines = []
    if report.get("targets"):
        lines += ["", "## Targets", ""] + [f"- {t}" for t in report["targets"]]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {t}" for t in report["notes"]]
    return lines


def _merge_markdown(report: dict) -> str:
    lines = [
        *markdown_head(report),
        "Whole processes, warm page cache, outputs on a tmpfs where there is one, contenders rotated each round; "
        f"median of {report['runs']} runs (spread = (max - min) / median)"
        + ("; torch's and mergekit's processes once each in a quick run." if report.get("quick") else "."),
        "",
        "| case | contender | seconds (median) | spread | GB/s | peak RSS | vs pysoup |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        ps = case["contenders"].get("pysoup", {})
        for name, c in case["contenders"].items():
            if name == "pysoup":
                rel = f"ratio to floor {ps['ratio_to_floor']:.2f}" if "ratio_to_floor" in ps else ""
            elif name == "io_floor":
                rel = "the floor"
            else:
                speedup = ps.get("speedup_vs_" + name, float("nan"))
                rel = f"pysoup {speedup:.1f}x faster" if not speedup < 1 else f"pysoup {1 / speedup:.1f}x slower"
            lines.append(
                f"| {case['case']} | {name} | {c['seconds']['median']:.3f} | {c['seconds']['spread']:.0%} | "
                f"{c['gb_per_s']:.2f} | {c['peak_rss_bytes'] / 2**20:.0f} MiB | {rel} |"
            )
    k = report.get("kernel")
    if k:
        lines += [
            "",
            f"In-memory kernel, 4 x bf16 of {k['elements']:,} elements, {k['threads']} threads:",
            "",
            "| contender | GB/s | seconds (median) |",
            "|---|---|---|",
        ]
        for name in ("pysoup", "torch", "triad"):
            lines.append(f"| {name} | {k[name]['gb_per_s']:.1f} | {k[name]['seconds']['median'] * 1e3:.1f} ms |")
        lines += [
            "",
            f"pysoup is {k['pysoup_vs_torch']:.2f}x torch and reaches {k['pysoup_fraction_of_triad']:.0%} "
            "of torch's triad bandwidth.",
        ]
    e = report.get("ema")
    if e:
        lines += [
            "",
            f"Multi-tensor EMA step, {e['params']:,} parameters in {e['tensors']} tensors, {e['threads']} threads "
            "(pysoup: pysoup.ops.lerp_; pysoup_bound: pysoup.ops.MultiTensorLerp):",
            "",
            "| dtype | contender | seconds (median) | spread | GB/s | its time / pysoup's |",
            "|---|---|---|---|---|---|",
        ]
        for label, cfg in e["configs"].items():
            ps = cfg["pysoup"]["seconds"]["median"]
            for name in ("pysoup", "pysoup_bound", "torch_foreach_lerp", "torch_loop"):
                c = cfg[name]
                rel = "" if name == "pysoup" else f"{c['seconds']['median'] / ps:.2f}"
                lines.append(
                    f"| {label} | {name} | {c['seconds']['median'] * 1e3:.1f} ms | {c['seconds']['spread']:.0%} | "
                    f"{c['gb_per_s']:.1f} | {rel} |"
                )
        o = e["overhead_500x64"]
        lines += [
            "",
            "Per-call overhead, 500 tensors of 64 fp32 elements: "
            + ", ".join(f"{name} {c['seconds']['median'] * 1e6:.0f} us" for name, c in o.items())
            + ".",
        ]
    return "\n".join(lines + _targets(report)) + "\n"


def _many_tensors_markdown(report: dict) -> str:
    lines = [
        *markdown_head(report),
        "Two files per case of tiny tensors (F32 4-element norms, BF16 2 x 2 experts); whole processes, warm page "
        "cache, output on a tmpfs where there is one, contenders rotated each round; medians (spread = (max - min) "
        "/ median). `open` columns: the time of `open(path)` + `len(keys())` inside the process (imports excluded); "
        "merge: `pysoup merge a b -o OUT` (uniform soup), the whole process.",
        "",
        "| tensors | header | contender | runs | call s | process s | spread | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        for name, c in case["contenders"].items():
            call = f"{c['call_seconds']['median']:.3f}" if "call_seconds" in c else ""
            lines.append(
                f"| {case['tensors']:,} | {case['header_bytes'] / 1e6:.1f} MB | {name} | {c['seconds']['n']} | "
                f"{call} | {c['seconds']['median']:.3f} | {c['seconds']['spread']:.0%} | "
                f"{c['peak_rss_bytes'] / 2**20:.0f} MiB |"
            )
    lines += [
        "",
        "| tensors | merge us / tensor | overhead over the I/O floor, us / tensor | RSS bound |",
        "|---|---|---|---|",
    ]
    for case in report["cases"]:
        if "merge_us_per_tensor" in case:
            lines.append(
                f"| {case['tensors']:,} | {case['merge_us_per_tensor']:.1f} | "
                f"{case['merge_overhead_us_per_tensor']:.1f} | {case['rss_bound_bytes'] / 2**20:.0f} MiB |"
            )
    return "\n".join(lines + _targets(report)) + "\n"


# -- chart -------------------------------------------------------------------------------------------------------


def can_plot() -> bool:
    """Whether matplotlib is installed (the chart is skipped without it)."""
    return importlib.util.find_spec("matplotlib") is not None


def plot(report: dict, path: str) -> bool:
    """A bar chart of each case's medians per contender (log scale) into `path`; False when there is nothing to
    draw or matplotlib is missing."""
    if not can_plot() or not report["cases"] or report["suite"] == MANY_TENSORS:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c["strategy"] if c.get("strategy", "linear") != "linear" else c["case"] for c in report["cases"]]
    names = sorted({n for c in report["cases"] for n in c["contenders"]}, key=lambda n: n != "pysoup")
    fig, ax = plt.subplots(figsize=(1.6 * len(cases) + 3, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [c["contenders"].get(name, {}).get("seconds", {}).get("median", 0) for c in report["cases"]]
        ax.bar([x + i * width for x in range(len(cases))], vals, width, label=name)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(cases))], cases, rotation=20, ha="right")
    ax.set_ylabel("seconds, whole process (median)")
    ax.set_yscale("log")
    ax.set_title(report["suite"] + ", bf16 checkpoints")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- files -------------------------------------------------------------------------------------------------------


def result_paths(out_dir: str, name: str) -> list:
    """The files a suite's results named `name` go to."""
    return [os.path.join(out_dir, name + ext) for ext in EXTENSIONS]


def check_out_dir(out_dir: str, name: str, force: bool = False) -> bool:
    """Refuses, before anything runs, an output directory the results could not be written to, or one holding
    earlier results of the same name (unless `force`). Creates the directory if it does not exist.

    Returns:
        Whether it created the directory.

    Raises:
        SoupError: one line naming the directory or the file.
    """
    from pysoup.errors import SoupError

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SoupError(f"--out {out_dir}: not a directory")
    created = not os.path.exists(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise SoupError(f"--out {out_dir}: cannot create it ({exc.strerror or exc})") from None
    probe = os.path.join(out_dir, f".pysoup-bench-probe-{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise SoupError(f"--out {out_dir}: cannot write there ({exc.strerror or exc})") from None
    existing = [p for p in result_paths(out_dir, name) if os.path.exists(p)]
    if existing and not force:
        raise SoupError(f"{existing[0]} exists (earlier results); pass --force to overwrite, or another --out")
    return created


def save(report: dict, out_dir: str, name: str) -> list:
    """Writes NAME.json, NAME.md and, with matplotlib, NAME.png into `out_dir`; returns the paths written."""
    json_path, md_path, png_path = result_paths(out_dir, name)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    with open(md_path, "w") as f:
        f.write(markdown(report))
    written = [json_path, md_path]
    if plot(report, png_path):
        written.append(png_path)
    elif os.path.exists(png_path):
        os.remove(png_path)  # an earlier run's chart (overwritten with --force) would not match these results
    return written
