"""Answer metrics (SQuAD-style F1, Rouge-L) and first-token agreement with full prefill.

F1 follows the SQuAD / LongBench scorer: lowercase, drop punctuation, drop the articles
a/an/the, collapse whitespace, then token-overlap F1; the score against several gold answers is
the best one. Rouge-L is the F-measure of ``rouge-score`` with Porter stemming.
First-token KL is KL(full || method) between the softmax of the two last-prompt-position logit
vectors, in float64: the cost, in nats, of serving the method's distribution instead of the
exact one.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower, strip punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of two answers after normalisation (1.0 if both normalise to empty)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def answer_f1(prediction: str, golds: Iterable[str]) -> float:
    """Best F1 of ``prediction`` against any gold answer (0.0 when there is none)."""
    return max((token_f1(prediction, gold) for gold in golds), default=0.0)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer  # optional extra: cacheblend[eval]

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, golds: Iterable[str]) -> float:
    """Best Rouge-L F-measure (stemmed) of ``prediction`` against any gold text."""
    scorer = _rouge_scorer()
    return max((scorer.score(gold, prediction)["rougeL"].fmeasure for gold in golds), default=0.0)


METRICS = {"f1": answer_f1, "rouge_l": rouge_l}


def answer_in_context(golds: Iterable[str], documents: Iterable[str]) -> bool:
    """Whether any gold answer occurs (normalised) in the passages the model is shown: the
    ceiling on answer F1 that truncating or dropping passages sets."""
    context = f" {normalize_answer(' '.join(documents))} "
    return any(f" {g} " in context for g in map(normalize_answer, golds) if g)


def first_token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(softmax(reference) || softmax(logits)) in nats; both (V,). Identical inputs give 0."""
    ref = torch.log_softmax(reference_logits.double().flatten(), dim=-1)  # (V,)
    other = torch.log_softmax(logits.double().flatten(), dim=-1)  # (V,)
    kl = torch.sum(ref.exp() * (ref - other))
    return max(0.0, float(kl))  # rounding can give -1e-17


def top1_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """1.0 when both logit vectors pick the same greedy first token, else 0.0."""
    return float(int(torch.argmax(reference_logits)) == int(torch.argmax(logits)))


def first_line(text: str) -> str:
    """The first non-empty line: how LongBench reads a short QA answer from a chatty model."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


# Statistics over examples: bootstrap intervals and the share of reuse's loss recovered.


def bootstrap_interval(statistic, *samples, level: float = 0.9, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``statistic(*samples)``: the samples are paired (one
    value per example each) and resampled together, with a fixed seed. None when empty."""
    import numpy as np

    arrays = [np.asarray(s, dtype=float) for s in samples]
    n = arrays[0].shape[0]
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(resamples, n))
    values = np.array([statistic(*(a[p] for a in arrays)) for p in picks], dtype=float)
    low, high = np.nanquantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def mean_of(values) -> float:
    import numpy as np

    return float(np.mean(values))


def recovered_share(method_kl, reuse_kl) -> float:
    """Share of reuse's first-token KL the method removes: 1 - mean(method) / mean(reuse), over
    the same examples. 1 = as exact as full prefill, 0 = no better than reuse, < 0 = worse.
    NaN when reuse's mean KL is 0 (nothing to recover)."""
    import numpy as np

    reuse = float(np.mean(reuse_kl))
    return 1.0 - float(np.mean(method_kl)) / reuse if reuse > 0 else float("nan")


def worse_than(method_kl, reuse_kl) -> int:
    """Number of examples where the method's KL exceeds reuse's on the same example."""
    return sum(1 for m, r in zip(method_kl, reuse_kl, strict=True) if m > r)


def percentile(values, q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))
