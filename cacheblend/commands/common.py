"""Arguments shared by every subcommand that builds an Engine."""

from __future__ import annotations

import argparse

from cacheblend.config import DTYPES, METHODS, EngineConfig, load_config


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF model dir or GGUF file (default: bundled SmolLM2)")
    parser.add_argument("--store", help="store URL: memory | disk:/path | redis://host:port/db "
                        "| a comma-separated list of tiers")
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--device", help="torch device: auto (default: cuda when present, "
                        "else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", choices=DTYPES, help="compute dtype (default auto: bf16 on "
                        "cuda, fp32 on cpu, where bf16 matmuls are ~100x slower)")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--prefill-step-tokens", type=int,
                        help="while requests decode, a prefill advances at most this many "
                        "tokens per engine step (chunked prefill; default 256)")


def add_method_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=METHODS, help="default: blend")
    parser.add_argument("--ratio", type=float, help="blend recompute ratio (default: the config's, 0.1)")


def engine_config(args: argparse.Namespace, **blend) -> EngineConfig:
    return load_config(
        args.config,
        model=args.model,
        store=args.store,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        prefill_step_tokens=args.prefill_step_tokens,
        blend={k: v for k, v in blend.items() if v is not None},
    )


def make_engine(args: argparse.Namespace, **blend):
    from cacheblend.engine import Engine  # torch/transformers load only when needed

    return Engine(engine_config(args, **blend))
