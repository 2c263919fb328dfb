"""What the reproductions in examples/ share: the machine line of their results, and writing the results as
examples/results/NAME.{json,md,png}."""

from __future__ import annotations

import json
import os
import platform

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def save(name: str, res: dict, text: str, plot) -> None:
    """Writes the results (JSON), their table (markdown) and plot(res, path) (PNG) under examples/results/."""
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(text)
    plot(res, os.path.join(RESULTS, f"{name}.png"))
    print(f"wrote {RESULTS}/{name}.{{json,md,png}}")
