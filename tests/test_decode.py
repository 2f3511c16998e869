"""Decode loop: greedy equals transformers' generate; sampling, seeds and stops behave."""

from __future__ import annotations

import pytest
import torch

from cacheblend.decode import Sampler, SamplingParams, StopChecker
from cacheblend.engine import GenerateRequest
from cacheblend.errors import InvalidRequestError


def test_greedy_equals_transformers_generate(engine_factory, loaded_model):
    engine = engine_factory()
    request = GenerateRequest(question="Name three colours.", documents=[],
                              method="full", sampling=SamplingParams(max_tokens=24))
    ids = torch.tensor([engine.segments_for(request).ids])
    with torch.inference_mode():
        expected = loaded_model.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
            eos_token_id=sorted(engine.eos_ids), pad_token_id=loaded_model.tokenizer.eos_token_id)
    new = expected[0, ids.shape[1]:].tolist()
    new = [t for t in new if t not in engine.eos_ids]
    result = engine.generate(request)
    assert result.token_ids == new[: len(result.token_ids)]
    assert len(result.token_ids) == len(new)


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(1000)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7)
    first = [Sampler(params)(logits) for _ in range(3)]
    sampler = Sampler(params)
    assert [sampler(logits) for _ in range(1)] == first[:1]
    assert len(set(first)) == 1  # a fresh sampler with the same seed draws the same token


def test_top_k_one_is_greedy():
    logits = torch.randn(1000)
    sampler = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=0))
    assert all(sampler(logits) == int(logits.argmax()) for _ in range(20))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([10.0, 9.0, -10.0, -10.0])
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0))
    assert {sampler(logits) for _ in range(50)} == {0}


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_k": -1},
                                 {"max_tokens": 0}, {"stop": ("",)}])
def test_invalid_sampling_values(bad):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**bad)


class FakeTokenizer:
    """Decodes ids as characters, so stop handling can be checked exactly."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_stop_string_is_cut_and_held_back():
    checker = StopChecker(FakeTokenizer(), SamplingParams(max_tokens=50, stop=("END",)), {0})
    out = [checker.add(ord(c)) for c in "abcEN"]
    assert "".join(out) == "abc"  # "EN" might start the stop string: held back
    out.append(checker.add(ord("D")))
    assert "".join(out) == "abc" and checker.done and checker.finish_reason == "stop"


def test_eos_and_max_tokens():
    checker = StopChecker(FakeTokenizer(), SamplingParams(max_tokens=2), {0})
    checker.add(ord("a"))
    checker.add(0)
    assert checker.finish_reason == "stop" and checker.text == "a"
    checker = StopChecker(FakeTokenizer(), SamplingParams(max_tokens=2), {0})
    checker.add(ord("a"))
    checker.add(ord("b"))
    assert checker.finish_reason == "length" and checker.text == "ab"


def test_min_tokens_holds_back_eos():
    logits = torch.tensor([0.0, 5.0, 1.0])  # token 1 (EOS here) is the argmax
    sampler = Sampler(SamplingParams(max_tokens=4, min_tokens=2), eos_ids=(1,))
    assert [sampler(logits), sampler(logits), sampler(logits)] == [2, 2, 1]
    assert Sampler(SamplingParams(max_tokens=4))(logits) == 1  # default: no hold-back
    with pytest.raises(InvalidRequestError):
        SamplingParams(max_tokens=2, min_tokens=3)


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324, 1e-6, 2e-5])
def test_tiny_temperatures_sample_the_argmax_without_nan(temperature):
    logits = torch.tensor([0.0, 30.0, 29.0, -5.0])
    sampler = Sampler(SamplingParams(max_tokens=2, temperature=temperature, seed=0))
    assert sampler(logits) == 1


# --- penalties, logit bias, logprobs (as vLLM) ---------------------------------------------------


def test_logit_bias_changes_the_greedy_choice():
    logits = torch.tensor([5.0, 1.0, 0.0])
    assert Sampler(SamplingParams())(logits) == 0
    assert Sampler(SamplingParams(logit_bias={2: 100.0}))(logits) == 2
    assert Sampler(SamplingParams(logit_bias={0: -100.0}))(logits) == 1
    assert Sampler(SamplingParams(logit_bias={99: 5.0}))(logits) == 0  # beyond the vocab: no-op


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    logits = torch.tensor([3.0, 2.5, 0.0])
    # The prompt holds token 0 many times: presence/frequency look at the output only.
    sampler = Sampler(SamplingParams(frequency_penalty=1.0), prompt_ids=[0, 0, 0, 0])
    assert [sampler(logits) for _ in range(3)] == [0, 1, 0]  # 3-1 < 2.5; then 2.5-1 < 2
    sampler = Sampler(SamplingParams(presence_penalty=2.0))
    logits = torch.tensor([1.0, 0.5, 0.0])
    assert [sampler(logits) for _ in range(4)] == [0, 1, 2, 0]  # each token once, then the third
    assert sampler.output_ids == [0, 1, 2, 0]


def test_repetition_penalty_covers_prompt_and_output():
    logits = torch.tensor([3.0, 2.0, -1.0, -1.5])
    # 3 / 2 = 1.5 < 2: the prompt's token 0 loses to token 1
    assert Sampler(SamplingParams(repetition_penalty=2.0), prompt_ids=[0])(logits) == 1
    sampler = Sampler(SamplingParams(repetition_penalty=2.0))
    assert [sampler(logits) for _ in range(3)] == [0, 1, 0]  # 1.5 > 1.0 after both are seen
    # negative logits are multiplied: -1 * 2 = -2 < -1.5
    negative = torch.tensor([-1.0, -1.5])
    assert Sampler(SamplingParams(repetition_penalty=2.0), prompt_ids=[0])(negative) == 1


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, -3.0])
    expected = torch.log_softmax(logits, dim=-1)
    sampler = Sampler(SamplingParams(logprobs=2, logit_bias={3: 100.0}, temperature=0.7, seed=1))
    token = sampler(logits)
    assert token == 3  # the bias decides the token, not the reported distribution
    (entry,) = sampler.logprobs
    assert entry.token == 3 and entry.logprob == pytest.approx(float(expected[3]))
    assert [t for t, _ in entry.top] == [0, 1]
    assert [v for _, v in entry.top] == pytest.approx(expected[:2].tolist())
    assert Sampler(SamplingParams())(logits) == 0 and Sampler(SamplingParams()).logprobs is None
    zero = Sampler(SamplingParams(logprobs=0))
    zero(logits)
    assert zero.logprobs[0].top == []


@pytest.mark.parametrize("bad", [{"presence_penalty": 2.5}, {"frequency_penalty": -3},
                                 {"repetition_penalty": 0.0}, {"logprobs": 21},
                                 {"logprobs": -1}, {"logit_bias": {5: 101.0}},
                                 {"logit_bias": {-1: 1.0}}])
def test_invalid_penalty_values(bad):
    with pytest.raises(InvalidRequestError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_extreme_repetition_penalty_stays_finite():
    logits = torch.tensor([3.0, 2.0, -1.0])
    sampler = Sampler(SamplingParams(repetition_penalty=1e-300, temperature=1.0, seed=0),
                      prompt_ids=[0, 1])
    assert sampler(logits) in (0, 1)  # inf logits would make the probabilities NaN
