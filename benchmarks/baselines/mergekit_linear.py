"""mergekit's linear merge of the inputs (uniform weights), through its own command line."""

import os
import subprocess
import sys
import tempfile


def main():
    out, inputs = sys.argv[1], sys.argv[2:]
    models = "\n".join(f"  - model: {p}\n    parameters: {{weight: 1.0}}" for p in inputs)
    config = f"models:\n{models}\nmerge_method: linear\ndtype: bfloat16\n"
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        f.write(config)
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    try:
        subprocess.run(
            [exe, f.name, out, "--no-copy-tokenizer", "--quiet", "--no-write-model-card"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    finally:
        os.unlink(f.name)


if __name__ == "__main__":
    main()
