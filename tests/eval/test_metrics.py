import math

import pytest
import torch

from cacheblend.eval.metrics import (
    answer_f1,
    answer_in_context,
    first_line,
    first_token_kl,
    normalize_answer,
    rouge_l,
    token_f1,
    top1_agreement,
)
from cacheblend.eval.plots import pareto_front


@pytest.mark.parametrize("text, expected", [
    ("The  Cat's, hat!", "cats hat"),
    ("An apple a day", "apple day"),
    ("  Exeter\tCollege.\n", "exeter college"),
    ("theatre anthem", "theatre anthem"),  # articles only as whole words
    ("...", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_token_f1_hand_computed():
    # pred [cat, sat], gold [cat, sat, down]: P = 1, R = 2/3, F1 = 0.8
    assert token_f1("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    # repeated tokens count once per occurrence: pred [paris, paris], gold [paris]
    assert token_f1("Paris Paris", "Paris") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("London", "Paris") == 0.0
    assert token_f1("", "Paris") == 0.0
    assert token_f1("the", "a") == 1.0  # both normalise to empty


def test_answer_f1_takes_the_best_gold():
    assert answer_f1("Exeter College", ["Oxford", "exeter college"]) == 1.0
    assert answer_f1("Exeter", ["Oxford", "Exeter College"]) == pytest.approx(2 / 3)
    assert answer_f1("anything", []) == 0.0


def test_rouge_l_hand_computed():
    # stemmed: gold [the, cat, are, run, home], pred [a, cat, ran, home]; LCS = cat home
    # P = 2/4, R = 2/5, F = 2PR / (P + R) = 4/9
    assert rouge_l("a cat ran home", ["the cats are running home"]) == pytest.approx(4 / 9)
    assert rouge_l("same words here", ["nothing alike", "same words here"]) == 1.0
    assert rouge_l("x", []) == 0.0


def test_kl_of_identical_logits_is_zero():
    logits = torch.randn(1000)
    assert first_token_kl(logits, logits) == 0.0
    assert first_token_kl(logits, logits + 3.0) == pytest.approx(0.0, abs=1e-12)  # shift-free


def test_kl_hand_computed_and_positive():
    p = torch.tensor([0.25, 0.75], dtype=torch.float64)
    q = torch.tensor([0.5, 0.5], dtype=torch.float64)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert first_token_kl(p.log(), q.log()) == pytest.approx(expected, rel=1e-9)
    other = torch.randn(1000)
    assert first_token_kl(torch.randn(1000), other) > 0


def test_top1_agreement():
    assert top1_agreement(torch.tensor([0.0, 2.0, 1.0]), torch.tensor([0.0, 5.0, 1.0])) == 1.0
    assert top1_agreement(torch.tensor([0.0, 2.0, 1.0]), torch.tensor([3.0, 2.0, 1.0])) == 0.0


def test_first_line():
    assert first_line("\n  Paris\nBecause ...") == "Paris"
    assert first_line("") == ""


def test_pareto_front():
    # (ttft, quality): b beats a on both; c is slower but better; d is dominated by c
    points = [(2.0, 0.5), (1.0, 0.6), (3.0, 0.9), (4.0, 0.8)]
    assert pareto_front(points) == [1, 2]


def test_answer_in_context_matches_whole_normalised_words():
    docs = ["He studied at Exeter College, Oxford.", "Unrelated."]
    assert answer_in_context(["exeter college"], docs)
    assert answer_in_context(["nowhere", "The Exeter College"], docs)  # any gold; articles go
    assert not answer_in_context(["Exeter Col"], docs)  # not a word boundary
    assert not answer_in_context(["", "Cambridge"], docs)


def test_recovered_share_and_worse_than_reuse_on_hand_made_rows():
    from cacheblend.eval.metrics import recovered_share, worse_than

    reuse = [0.4, 0.2, 0.2, 0.2]  # mean 0.25
    method = [0.1, 0.1, 0.3, 0.0]  # mean 0.125: half of reuse's KL removed
    assert recovered_share(method, reuse) == pytest.approx(0.5)
    assert recovered_share(reuse, reuse) == pytest.approx(0.0)
    assert recovered_share([0.0] * 4, reuse) == pytest.approx(1.0)
    assert recovered_share([0.5] * 4, reuse) == pytest.approx(-1.0)  # worse than reuse
    assert math.isnan(recovered_share([0.1], [0.0]))
    assert worse_than(method, reuse) == 1  # only the third example


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    from cacheblend.eval.metrics import bootstrap_interval, mean_of, recovered_share

    values = [0.0, 1.0] * 25
    low, high = bootstrap_interval(mean_of, values)
    assert low < 0.5 < high and 0.35 < low and high < 0.65  # sd of the mean ~0.07
    assert bootstrap_interval(mean_of, values) == (low, high)  # fixed seed
    assert bootstrap_interval(mean_of, [0.3] * 10) == pytest.approx((0.3, 0.3))
    assert bootstrap_interval(mean_of, []) is None
    # paired: the share's interval resamples examples, keeping each method's pair together
    method, reuse = [0.1, 0.2, 0.1, 0.2], [0.2, 0.4, 0.2, 0.4]
    assert bootstrap_interval(recovered_share, method, reuse) == pytest.approx((0.5, 0.5))


def test_summary_against_best_reuse_on_hand_made_rows():
    from cacheblend.eval.runner import summarize

    def row(example, method, base, kl, top1=1.0):
        return {"example": example, "method": method, "base": base, "kl_first_token": kl,
                "top1_agreement": top1, "ttft_s": 1.0}

    rows = [row("a", "reuse", "reuse", 0.2), row("b", "reuse", "reuse", 0.4),
            row("a", "reuse/prefix", "reuse", 0.5), row("b", "reuse/prefix", "reuse", 0.5),
            row("a", "blend", "blend", 0.25), row("b", "blend", "blend", 0.05, 0.0)]
    out = summarize(rows, ["reuse", "reuse/prefix", "blend"], "f1")
    blend = out["blend"]
    assert blend["best_reuse"] == "reuse"  # the better mode, not the one blend uses
    assert blend["recovered"] == pytest.approx(1 - 0.15 / 0.3)
    assert blend["worse_than_reuse"] == 1 and blend["n_vs_reuse"] == 2
    assert blend["kl_p90"] == pytest.approx(0.23)
    assert out["reuse/prefix"]["recovered"] < 0
    assert blend["top1_ci"][0] <= 0.5 <= blend["top1_ci"][1]
