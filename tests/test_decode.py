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
