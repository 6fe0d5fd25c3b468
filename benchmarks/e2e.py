"""The end-to-end benchmark against MONAI: ``ahnet_fast/benchmark.py`` (``ahnet-fast bench``), kept
runnable from here as the README's commands call it: ``python benchmarks/e2e.py --help``."""
import sys

from ahnet_fast.benchmark import main

if __name__ == "__main__":
    sys.exit(main(prog="benchmarks/e2e.py"))
