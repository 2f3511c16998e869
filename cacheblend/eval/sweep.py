"""TTFT against prompt length: full, prefix, reuse, blend, and peers, on the same prompts.

For each target length the prompt is ``prefix | chunks of ~chunk_tokens tokens | question``,
its chunks cut from synthetic text or from a dataset's passages. Each method runs once untimed
(warm-up; for reuse/blend/epic this also stores the chunks), then ``repeats`` timed requests,
round-robin over the methods; the median TTFT is reported (and the minimum).

- ``prefix`` is timed as a RAG request meets a prefix cache: the system prefix is cached, the
  chunks (in an order not seen before) are not. Each timed request uses a fresh store holding only
  the system prefix, since repeating the same prompt would hit its whole chain.
- ``hf_full`` is transformers' own forward of the same ids (``logits_to_keep=1``), timed the
  same way: a check that our full prefill is not slower than the reference implementation.
- ``llama_cpp`` (optional, when ``llama_cpp`` imports) prefills the same ids with llama.cpp on
  the GGUF weights (quantized: a speed peer, not a quality one).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from statistics import median

import torch
from tqdm import tqdm

from cacheblend.decode import SamplingParams
from cacheblend.engine import Engine, GenerateRequest
from cacheblend.eval.methods import MethodSpec, parse_methods
from cacheblend.eval.runner import generate_hit, warm_up
from cacheblend.store.memory import MemoryStore

log = logging.getLogger(__name__)

DEFAULT_LENGTHS = (1024, 2048, 4096, 7680)  # 8K would leave no room in 8192 positions
DEFAULT_METHODS = "full,prefix,reuse,blend,hf_full,llama_cpp"
PEERS = ("hf_full", "llama_cpp")
QUESTION = "What are the main topics of the documents above?"
SWEEP_FILE = "ttft_sweep.json"

_WORDS = (
    "river", "market", "engine", "winter", "signal", "garden", "harbor", "silver", "theory",
    "museum", "village", "council", "journey", "protein", "glacier", "archive", "orbit",
    "lantern", "festival", "canal", "treaty", "compiler", "meadow", "cathedral", "voltage",
    "harvest", "dialect", "furnace", "telescope", "parliament", "mineral", "orchestra", "railway",
    "volcano", "ledger", "comet", "pharmacy", "lagoon",
)


def synthetic_text(num_words: int, seed: int = 0) -> str:
    """Deterministic filler prose: sentences of random words with numbers."""
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < num_words:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 16))]
        words[0] = words[0].capitalize()
        sentences.append(" ".join(words) + f" in {rng.randint(1800, 2024)}.")
    return " ".join(sentences)


def make_chunks(text: str, tokenizer, num_chunks: int, chunk_tokens: int) -> list[str]:
    """``num_chunks`` documents of about ``chunk_tokens`` tokens each, cut from ``text``
    (repeated if it is too short)."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    need = num_chunks * chunk_tokens
    if not ids:
        raise ValueError("no text to cut chunks from")
    while len(ids) < need:
        ids = ids + ids
    return [tokenizer.decode(ids[i * chunk_tokens:(i + 1) * chunk_tokens]).strip()
            for i in range(num_chunks)]


def _request(documents: list[str], method: str) -> GenerateRequest:
    return GenerateRequest(question=QUESTION, documents=documents, method=method,
                           sampling=SamplingParams(max_tokens=1))


def _prefix_ttft(engine: Engine, documents: list[str]) -> float:
    """TTFT of a prefix-cache request whose system prefix is cached and chunks are not."""
    # A fresh store holds only this request's entries; the shared store is untouched.
    alone = Engine(engine.config, store=MemoryStore(), loaded=engine.loaded)
    alone.generate(_request([], "prefix"))  # caches the system prefix
    return alone.generate(_request(documents, "prefix")).stats.ttft_s


def _hf_ttft(engine: Engine, ids: list[int]) -> float:
    model = engine.loaded.model
    tensor = torch.tensor(ids, dtype=torch.long, device=engine.config.device)
    with engine.lock, torch.inference_mode():
        start = time.perf_counter()
        logits = model(tensor[None], logits_to_keep=1).logits  # (1, 1, V)
        int(torch.argmax(logits[0, -1]))
        return time.perf_counter() - start


class _LlamaCpp:
    """llama.cpp on the GGUF weights; None when llama_cpp is not installed."""

    def __init__(self, engine: Engine) -> None:
        import llama_cpp  # optional peer

        from cacheblend.model.loader import bundled_gguf_path

        model = engine.config.model
        path = model if model and str(model).endswith(".gguf") else str(bundled_gguf_path())
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=engine.runner.max_positions,
                                   n_threads=torch.get_num_threads(), verbose=False)

    def ttft(self, ids: list[int]) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        self.llm.sample(temp=0.0)  # the first token, greedy (scores are kept only with
        # logits_all, which would make llama.cpp compute every position's logits)
        return time.perf_counter() - start


def _llama_cpp(engine: Engine):
    try:
        return _LlamaCpp(engine)
    except ImportError:
        log.info("llama_cpp is not installed: skipping the llama.cpp peer")
        return None


def parse_sweep_methods(text: str, precompute: list[str] | None = None
                        ) -> tuple[list[MethodSpec], list[str]]:
    """Engine method specs and peer names (``hf_full``, ``llama_cpp``) from one list."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    peers = [item for item in items if item in PEERS]
    specs_text = ",".join(item for item in items if item not in PEERS)
    specs = parse_methods(specs_text, precompute) if specs_text else []
    return specs, peers


def run_sweep(engine: Engine, lengths=DEFAULT_LENGTHS, methods: str = DEFAULT_METHODS,
              repeats: int = 3, chunk_tokens: int = 512, source_text: str | None = None,
              source: str = "synthetic", precompute: list[str] | None = None,
              progress: bool = True) -> dict:
    """Median TTFT per (method, length). Returns the JSON-ready result.

    At each length every method is warmed up first, then the timed runs go round-robin over the
    methods, so a change in the machine's load hits every method alike.
    """
    specs, peers = parse_sweep_methods(methods, precompute)
    limit = engine.runner.max_positions
    text = source_text or synthetic_text(12000)
    llama = _llama_cpp(engine) if "llama_cpp" in peers else None
    labels = [s.label for s in specs] + [p for p in peers if p != "llama_cpp" or llama]
    results: dict[str, list[dict]] = {label: [] for label in labels}
    overhead = engine.segments_for(_request([], "full")).num_tokens
    warm_up(engine)
    steps = len(lengths) * (repeats + 1) * len(labels)
    with tqdm(total=steps, desc="ttft sweep", unit="run", disable=not progress) as bar:
        for length in lengths:
            num_chunks = max(1, round((length - overhead) / chunk_tokens))
            documents = make_chunks(text, engine.tokenizer, num_chunks, chunk_tokens)
            ids = engine.segments_for(_request(documents, "full")).ids
            if len(ids) + 1 >= limit:
                raise ValueError(f"sweep length {length} gives a {len(ids)}-token prompt; "
                                 f"the model allows {limit - 1}")
            timers = {label: _timer(engine, label, specs, documents, ids, llama)
                      for label in labels}
            times: dict[str, list[float]] = {label: [] for label in labels}
            for round_index in range(repeats + 1):  # round 0 is the warm-up
                for label in labels:
                    bar.set_postfix_str(f"{length} {label}", refresh=True)
                    seconds = timers[label]()
                    if round_index:
                        times[label].append(seconds)
                    bar.update()
            for label in labels:
                results[label].append({"target_tokens": length, "prompt_tokens": len(ids),
                                       "ttft_s": median(times[label]),
                                       "ttft_min_s": min(times[label]),
                                       "ttft_all": times[label]})
    return {"lengths": list(lengths), "repeats": repeats, "chunk_tokens": chunk_tokens,
            "source": source, "methods": results,
            "skipped_peers": [p for p in peers if p not in labels]}


def _timer(engine: Engine, label: str, specs: list[MethodSpec], documents: list[str],
           ids: list[int], llama) -> Callable[[], float]:
    """A function that runs one request of ``label`` and returns its TTFT in seconds."""
    if label == "hf_full":
        return lambda: _hf_ttft(engine, ids)
    if label == "llama_cpp":
        return lambda: llama.ttft(ids)
    spec = next(s for s in specs if s.label == label)
    if spec.method == "prefix":
        return lambda: _prefix_ttft(engine, documents)
    request = _request(documents, spec.method)
    request.blend = spec.request_blend(engine)
    # the warm-up round stores the chunks for reuse / blend / epic; later rounds hit them
    return lambda: generate_hit(engine, request).stats.ttft_s
