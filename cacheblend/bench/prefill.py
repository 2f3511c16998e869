"""`cacheblend bench prefill`: the runner's full prefill against transformers' own forward, the
same model on the same device in the same dtype, transformers with SDPA attention."""

from __future__ import annotations

import torch

from cacheblend.bench.timing import interleaved_medians
from cacheblend.device import dtype_name, synchronize

LENGTHS = (512, 1024, 2048, 3072, 4096)


def bench_prefill(loaded, lengths=LENGTHS, repeats: int = 3) -> dict:
    """Tokens/s of ``runner.prefill`` and of ``model(ids, logits_to_keep=1)`` (the fastest way
    to get a first token out of transformers), same model, same threads, same run."""
    runner = loaded.runner()
    model = loaded.model
    device = runner.device
    out = {"model": loaded.name, "device": _device_label(device), "dtype": dtype_name(runner.dtype),
           "peer": f"transformers {_transformers_version()} forward, "
                   f"attn={model.config._attn_implementation}",
           "lengths": [], "engine_tok_s": [], "hf_tok_s": [], "ratio": [],
           "threads": torch.get_num_threads(), "repeats": repeats}
    generator = torch.Generator().manual_seed(0)
    for length in lengths:
        if length > runner.max_positions:
            raise ValueError(f"length {length} exceeds the model's {runner.max_positions} positions")
        ids = torch.randint(0, runner.vocab_size, (length,), generator=generator).to(device)

        def engine(ids=ids):
            runner.prefill(ids)
            synchronize(device)

        def hf(ids=ids):
            model(ids[None], logits_to_keep=1)
            synchronize(device)

        with torch.inference_mode():
            medians = interleaved_medians({"engine": engine, "hf": hf}, repeats=repeats)
        out["lengths"].append(length)
        out["engine_tok_s"].append(round(length / medians["engine"], 1))
        out["hf_tok_s"].append(round(length / medians["hf"], 1))
        out["ratio"].append(round(medians["hf"] / medians["engine"], 3))
    return out


def _device_label(device: torch.device) -> str:
    """``cpu (2 threads)`` or the CUDA device's name: results name the hardware."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
