"""`cacheblend bench prefill`: the runner's full prefill against transformers' own forward."""

from __future__ import annotations

import torch

from cacheblend.bench.timing import interleaved_medians

LENGTHS = (512, 1024, 2048, 3072, 4096)


def bench_prefill(loaded, lengths=LENGTHS, repeats: int = 3) -> dict:
    """Tokens/s of ``runner.prefill`` and of ``model(ids, logits_to_keep=1)`` (the fastest way
    to get a first token out of transformers), same model, same threads, same run."""
    runner = loaded.runner()
    model = loaded.model
    out = {"lengths": [], "engine_tok_s": [], "hf_tok_s": [], "ratio": [],
           "threads": torch.get_num_threads(), "repeats": repeats}
    generator = torch.Generator().manual_seed(0)
    for length in lengths:
        ids = torch.randint(0, runner.vocab_size, (length,), generator=generator)
        with torch.inference_mode():
            medians = interleaved_medians({
                "engine": lambda ids=ids: runner.prefill(ids),
                "hf": lambda ids=ids: model(ids[None], logits_to_keep=1),
            }, repeats=repeats)
        out["lengths"].append(length)
        out["engine_tok_s"].append(round(length / medians["engine"], 1))
        out["hf_tok_s"].append(round(length / medians["hf"], 1))
        out["ratio"].append(round(medians["hf"] / medians["engine"], 3))
    return out
