"""mergekit 0.1.5 on a YAML config, through its own command line: python mergekit_run.py CONFIG OUT_DIR."""

import os
import subprocess
import sys


def main():
    config, out = sys.argv[1], sys.argv[2]
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    subprocess.run(
        [exe, config, out, "--no-copy-tokenizer", "--quiet", "--no-write-model-card"],
        check=True,
        stdout=subprocess.DEVNULL,
    )


if __name__ == "__main__":
    main()
