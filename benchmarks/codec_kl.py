"""First-token KL a store codec adds: one chunk precomputed after the prefix (so `reuse` is
exact up to the codec's rounding), `reuse` against `full`, per codec.

    .venv/bin/python benchmarks/codec_kl.py
"""

import torch

from cacheblend.commands.demo_corpus import DOCUMENTS
from cacheblend.config import load_config
from cacheblend.engine import Engine, GenerateRequest
from cacheblend.model.loader import load_model
from cacheblend.store.codec import decode, encode
from cacheblend.store.memory import MemoryStore


class CodecMemoryStore(MemoryStore):
    """A memory tier that stores what a codec round trip gives back."""

    def __init__(self, codec: str) -> None:
        super().__init__()
        self.codec = codec

    def put(self, key, kv):
        super().put(key, decode(encode(kv, self.codec)))


def kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    return torch.nn.functional.kl_div(other.log_softmax(-1), reference.log_softmax(-1),
                                      log_target=True, reduction="sum").item()


def main() -> None:
    loaded = load_model()
    document = next(iter(DOCUMENTS.values()))
    for codec in ("fp32", "fp16", "int8"):
        config = load_config(None, store_codec="fp32", blend={"precompute": "prefix"})
        engine = Engine(config, store=CodecMemoryStore(codec), loaded=loaded)
        engine.ingest([document], progress=False)
        request = GenerateRequest(question="Who designed it?", documents=[document])
        _, full, _ = engine.prefill(GenerateRequest(**{**vars(request), "method": "full"}))
        _, reuse, stats = engine.prefill(GenerateRequest(**{**vars(request), "method": "reuse"}))
        assert stats.missed_tokens == 0
        print(f"{codec}: max |logit diff| {(full - reuse).abs().max().item():.2e}, "
              f"first-token KL {kl(full, reuse):.2e}")


if __name__ == "__main__":
    main()
