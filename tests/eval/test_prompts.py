from cacheblend.eval.methods import parse_methods
from cacheblend.eval.prompts import PROMPTS, answer_text, prompts_version
from cacheblend.eval.runner import EvalPlan


def test_answer_text_reads_what_each_task_scores():
    assert answer_text("qa", "\n Paris\nBecause it is the capital.") == "Paris"
    assert answer_text("dialogue", "Summary: Anna will call Ben.") == "Anna will call Ben."
    assert answer_text("dialogue", "summary:\nAnna will call Ben. ") == "Anna will call Ben."
    assert answer_text("news", "  The summit ended.  ") == "The summit ended."
    # Only a leading label is removed.
    assert answer_text("news", "The Summary: section") == "The Summary: section"


def test_plan_takes_the_task_stop_strings_and_decode_length():
    specs = parse_methods("full,blend")
    news = EvalPlan.build(specs, "news")
    assert news.stop == PROMPTS["news"].stop == ("\n\n",)
    assert news.max_tokens == PROMPTS["news"].max_tokens
    assert EvalPlan.build(specs, "qa", max_tokens=7).stop == ()
    assert EvalPlan.build(specs, "qa", max_tokens=7).max_tokens == 7


def test_prompt_version_changes_with_any_template_field():
    before = prompts_version()
    original = PROMPTS["news"]
    try:
        PROMPTS["news"] = original.__class__(**{**original.__dict__, "stop": ("\n",)})
        assert prompts_version() != before
    finally:
        PROMPTS["news"] = original
    assert prompts_version() == before
