from cacheblend.eval.prompts import PROMPTS, answer_text, prompts_version


def test_answer_text_reads_what_each_task_scores():
    assert answer_text("qa", "\n Paris\nBecause it is the capital.") == "Paris"
    assert answer_text("dialogue", "Summary: Anna will call Ben.") == "Anna will call Ben."
    # The label alone on its line, the summary after a blank line: the summary is scored.
    assert answer_text("dialogue", "summary:\n\nAnna will call Ben. ") == "Anna will call Ben."
    assert answer_text("news", "  The summit ended.\n\nIn other news...") == "The summit ended."
    assert answer_text("news", "The Summary: section") == "The Summary: section"


def test_prompt_version_changes_with_any_template_field():
    before = prompts_version()
    original = PROMPTS["news"]
    try:
        PROMPTS["news"] = original.__class__(**{**original.__dict__, "max_tokens": 7})
        assert prompts_version() != before
    finally:
        PROMPTS["news"] = original
    assert prompts_version() == before
