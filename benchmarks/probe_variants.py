"""The probe's two design choices, measured against what they replaced (issue 12, docs/results.md).

Runs ``cacheblend eval`` with the probe changed in one of two ways:

- ``--score weight``: rank by the last position's attention weight, mean over heads (before:
  ``share`` weighs it by each token's value norm, ``select.output_share``);
- ``--long-suffix share:F``: a suffix too long to probe whole is probed by as many of its last
  tokens as fit in F of the budget (``share:0.5`` with ``--long-suffix hkvd``: the fallback
  before, HKVD) instead of its last ``probe_tail`` tokens.

The eval's results are keyed by method and settings, not by this script's variant: give every
variant its own ``--out``. For example, the development runs of docs/results.md::

    python benchmarks/probe_variants.py --score weight -- eval --dataset musique --limit 16 \\
        --passage-tokens 320 --methods 'full,reuse,blend[qa]+probe30@0.12:L0' \\
        --decode-methods none --out runs/dev_weight --threads 1
"""

from __future__ import annotations

import argparse
import sys

import torch

from cacheblend.blend import planner, probe
from cacheblend.cli import main


def weight_only(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The score before: the attention weight, mean over heads (values unused)."""
    return probs.mean(dim=(0, 1))


def tail_by_share(share: float, hkvd: bool):
    """A ``Planner._probe_tokens`` that probes as much of a long suffix's tail as ``share`` of
    the budget buys (or none, so HKVD selects, with ``hkvd``)."""

    def probe_tokens(self, layers, suffix_tokens, chunk_tokens, blend) -> int:
        if not layers:
            return 0
        fits = int(blend.ratio * share * self._token_layers_after(chunk_tokens, blend)
                   / min(layers, self.num_layers))
        if suffix_tokens <= fits or not hkvd:
            return min(suffix_tokens, fits)
        return 0

    return probe_tokens


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--score", choices=("share", "weight"), default="share")
    parser.add_argument("--long-suffix", default="tail",
                        help="tail (today) | share:F (the last tokens F of the budget buys) "
                             "| hkvd (no probe: HKVD, the fallback before)")
    parser.add_argument("eval_args", nargs=argparse.REMAINDER,
                        help="'--' then the cacheblend command line (eval ...)")
    args = parser.parse_args(argv)
    if args.score == "weight":
        probe.output_share = weight_only
    if args.long_suffix == "hkvd":
        planner.Planner._probe_tokens = tail_by_share(0.5, hkvd=True)
    elif args.long_suffix.startswith("share:"):
        planner.Planner._probe_tokens = tail_by_share(float(args.long_suffix[6:]), hkvd=False)
    elif args.long_suffix != "tail":
        parser.error("--long-suffix: tail, share:F or hkvd")
    rest = args.eval_args[1:] if args.eval_args[:1] == ["--"] else args.eval_args
    return main(rest)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
