"""The command-line arguments the quality benchmarks here share: which examples of which
dataset, how long a passage, how many threads. Import it from a script in this folder (running
``python benchmarks/x.py`` puts the folder on the import path)."""

from __future__ import annotations

import argparse

import torch

from cacheblend.config import load_config
from cacheblend.engine import Engine
from cacheblend.eval.datasets import LoadedDataset, load_dataset
from cacheblend.model.loader import load_model
from cacheblend.store.memory import MemoryStore


def dataset_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser described by the first line of ``doc``, with --dataset, --limit,
    --passage-tokens and --threads (the defaults of docs/results.md's runs)."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--dataset", default="musique")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--passage-tokens", type=int, default=320)
    parser.add_argument("--threads", type=int, default=1)
    return parser


def bundled_engine(threads: int) -> Engine:
    """The bundled model's engine on the CPU (in-memory store, no full-prefill fallback, so
    every request is served as asked) on ``threads`` threads."""
    torch.set_num_threads(threads)
    return Engine(load_config(None, blend={"fallback": False}), store=MemoryStore(),
                  loaded=load_model(device="cpu"))


def engine_and_dataset(args: argparse.Namespace) -> tuple[Engine, LoadedDataset]:
    """``bundled_engine(args.threads)`` and the dataset the arguments name."""
    engine = bundled_engine(args.threads)
    dataset = load_dataset(args.dataset, passage_tokens=args.passage_tokens, limit=args.limit,
                           tokenizer=engine.tokenizer)
    return engine, dataset
