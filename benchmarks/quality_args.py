"""The command-line arguments the quality benchmarks here share: which examples of which
dataset, how long a passage, how many threads. Import it from a script in this folder (running
``python benchmarks/x.py`` puts the folder on the import path)."""

from __future__ import annotations

import argparse


def dataset_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser described by the first line of ``doc``, with --dataset, --limit,
    --passage-tokens and --threads (the defaults of docs/results.md's runs)."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--dataset", default="musique")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--passage-tokens", type=int, default=320)
    parser.add_argument("--threads", type=int, default=1)
    return parser
