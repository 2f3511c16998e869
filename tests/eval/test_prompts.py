from cacheblend.eval.prompts import PROMPTS, answer_text, build_segments, prompts_version


def test_answer_text_reads_what_each_task_scores():
    assert answer_text("qa", "\n Paris\nBecause it is the capital.") == "Paris"
    assert answer_text("dialogue", " Anna will call Ben.\n\nDialogue:") == "Anna will call Ben."
    assert answer_text("news", "  The summit ended.\n\nIn other news...") == "The summit ended."


def test_prompt_version_follows_the_task_template_only():
    before = {kind: prompts_version(kind) for kind in PROMPTS}
    original = PROMPTS["news"]
    try:
        PROMPTS["news"] = original.__class__(**{**original.__dict__, "max_tokens": 7})
        assert prompts_version("news") != before["news"]
        assert prompts_version("qa") == before["qa"]  # other tasks' results stay valid
    finally:
        PROMPTS["news"] = original
    assert {kind: prompts_version(kind) for kind in PROMPTS} == before


def test_dialogue_reply_opens_with_the_label(loaded, data_dir):
    from cacheblend.eval.datasets import load_dataset
    from cacheblend.prompt import PromptBuilder

    builder = PromptBuilder(loaded.tokenizer)
    example = load_dataset("samsum", data_dir=data_dir, limit=1).examples[0]
    text = loaded.tokenizer.decode(build_segments(builder, example).suffix)
    assert text.endswith("assistant\nSummary:")
    # ... and the answer may not end right after the label.
    from cacheblend.eval.methods import parse_methods
    from cacheblend.eval.runner import EvalPlan

    assert EvalPlan.build(parse_methods("full"), "dialogue").min_tokens == 4
    assert EvalPlan.build(parse_methods("full"), "qa").min_tokens == 0
