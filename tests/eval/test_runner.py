import json

import pytest

from cacheblend.eval.datasets import load_dataset
from cacheblend.eval.methods import parse_methods
from cacheblend.eval.runner import (
    RESULTS_FILE,
    EvalPlan,
    ResultLog,
    run_dataset,
    setting_id,
    setting_of,
    summarize,
)


@pytest.fixture
def tiny(data_dir, loaded):
    return load_dataset("musique", data_dir=data_dir, limit=1, passages=2, passage_tokens=64,
                        tokenizer=loaded.tokenizer)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_is_resumable(engine, tiny, tmp_path):
    specs = parse_methods("full,reuse,blend")
    plan = EvalPlan.build(specs, "qa", max_tokens=2, decode={"blend"}, progress=False)
    assert plan.decode == {"blend", "full"}
    first = run_dataset(engine, tiny, plan, tmp_path)
    assert first["evaluated_now"] == 1
    written = rows(tmp_path / RESULTS_FILE)
    assert len(written) == 3
    full = first["methods"]["full"]
    assert full["kl_first_token"] == 0.0 and full["top1_agreement"] == 1.0
    assert full["f1_vs_full"] == 1.0
    assert first["methods"]["reuse"]["n_decoded"] == 0
    assert first["methods"]["reuse"]["f1"] is None
    assert all(r["missed_tokens"] == 0 and r["ttft_s"] > 0 for r in written)
    blend = first["methods"]["blend"]
    assert blend["kl_first_token"] >= 0 and blend["n_decoded"] == 1 and blend["ratio"] == 0.1

    second = run_dataset(engine, tiny, plan, tmp_path)  # everything done: nothing runs
    assert second["evaluated_now"] == 0
    assert len(rows(tmp_path / RESULTS_FILE)) == 3
    assert second["methods"] == first["methods"]

    # a new method: only its rows are added; full's reference logits come from disk
    more = EvalPlan.build(parse_methods("full,reuse,blend,epic@8"), "qa", max_tokens=2,
                          decode={"blend"}, progress=False)
    third = run_dataset(engine, tiny, more, tmp_path)
    assert third["evaluated_now"] == 1
    added = rows(tmp_path / RESULTS_FILE)[3:]
    assert [r["method"] for r in added] == ["epic@8"]

    # another decode length is another setting: its rows are not mixed with these
    other = EvalPlan.build(specs, "qa", max_tokens=5, decode=set(), progress=False)
    assert setting_id(setting_of(engine, tiny, other, 0)) != first["setting_id"]
    assert ResultLog(tmp_path / RESULTS_FILE, "another-setting").rows == {}


def test_decode_methods_must_be_evaluated():
    with pytest.raises(ValueError):
        EvalPlan.build(parse_methods("full,reuse"), "qa", decode={"blend"})


def test_scores_compare_the_examples_every_decoding_method_answered():
    def row(example, method, f1=None, served="blend"):
        base = "full" if method == "full" else "blend"
        out = {"example": example, "method": method, "base": base, "served_as": served,
               "ttft_s": 1.0, "decoded": f1 is not None}
        if f1 is not None:
            out.update(f1=f1, f1_vs_full=f1)
        return out

    data = [row("a", "full", 1.0, "full"), row("b", "full", 0.0, "full"),
            row("a", "blend", 0.5), row("b", "blend", served="full")]  # b: blend not decoded
    summary = summarize(data, ["full", "blend"], "f1")
    assert summary["full"]["f1"] == 1.0 and summary["full"]["n_decoded"] == 1  # only "a"
    assert summary["blend"]["f1"] == 0.5 and summary["blend"]["n"] == 2
    assert summary["blend"]["served_otherwise"] == 1 and summary["full"]["served_otherwise"] == 0
