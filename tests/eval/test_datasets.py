import json
from collections import Counter

import pytest

from cacheblend.errors import CacheBlendError
from cacheblend.eval.datasets import (
    dataset_info,
    find_data_dir,
    load_common_file,
    load_dataset,
    load_multi_news,
    load_samsum,
    samsum_shot_pool,
    split_passages,
    truncate_text,
)


def test_musique(data_dir):
    raw = load_common_file(data_dir / "musique/musique_s.json", "musique")
    assert len(raw) == 150 and all(len(e.documents) == 10 for e in raw)
    assert raw[0].answers == ("Exeter College",) and raw[0].kind == "qa"
    dataset = load_dataset("musique", data_dir=data_dir, limit=5)
    assert len(dataset.examples) == 5 and dataset.passages == 6
    assert all(len(e.documents) == 6 for e in dataset.examples)
    assert dataset.examples[0].documents == raw[0].documents[:6]
    later = load_dataset("musique", data_dir=data_dir, limit=3, skip=2)  # examples 2, 3, 4
    assert [e.id for e in later.examples] == [e.id for e in dataset.examples[2:5]]
    assert len(load_dataset("musique", data_dir=data_dir, skip=148).examples) == 2


def test_2wikimqa_answers_are_flattened(data_dir):
    examples = load_dataset("2wikimqa", data_dir=data_dir).examples
    assert len(examples) == 102
    assert examples[0].answers == ("Croatia",)
    assert all(e.answers and all(isinstance(a, str) for a in e.answers) for e in examples)


def test_multi_news_passage_split(data_dir):
    examples = load_multi_news(data_dir / "multi_news/multi_news.jsonl")
    assert len(examples) == 200
    counts = Counter(len(e.documents) for e in examples)
    assert (counts[1], counts[2], counts[3], counts[4]) == (2, 88, 72, 25)
    assert sum(n for k, n in counts.items() if k >= 5) == 13
    for example in examples:
        assert example.kind == "news" and example.answers
        for doc in example.documents:
            assert "NEWLINE_CHAR" not in doc and not doc.startswith("Passage ")


def test_split_passages_by_hand():
    context = "Passage 1:\nFirst NEWLINE_CHAR NEWLINE_CHAR story.\nPassage 2:\nSecond one.\n"
    assert split_passages(context) == ["First\n\nstory.", "Second one."]


def test_samsum_overlap_exclusion(data_dir):
    test, validation = data_dir / "samsum/test.jsonl", data_dir / "samsum/validation.jsonl"
    pool, excluded = samsum_shot_pool(test, validation)
    assert excluded == 4 and len(pool) == 818 - 4
    examples = load_samsum(test, validation, shots=6, seed=0)
    assert len(examples) == 819
    test_dialogues = {e.query for e in examples}
    shots = {d for e in examples for d in e.documents}
    assert all(d.startswith("Dialogue:\n") and "\nSummary: " in d for d in shots)
    assert not any(d[len("Dialogue:\n"):d.index("\nSummary: ")] in test_dialogues for d in shots)
    again = load_samsum(test, validation, shots=6, seed=0)
    assert again[0].documents == examples[0].documents  # the seed fixes the shots
    other = load_samsum(test, validation, shots=6, seed=1)
    assert other[0].documents != examples[0].documents


def test_common_file_and_errors(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"question": "Q?", "answers": [["a", "b"], "c"],
                                 "ctxs": [{"title": "T", "text": "body"}, {"text": "x"}]}]))
    (example,) = load_common_file(path)
    assert example.id == "mine-0" and example.answers == ("a", "b", "c")
    assert example.documents == ("T\nbody", "x")
    dataset = load_dataset(data_file=path, passages=1)
    assert dataset.name == "mine" and dataset.examples[0].documents == ("T\nbody",)
    path.write_text(json.dumps([{"question": "Q?"}]))
    with pytest.raises(CacheBlendError):
        load_common_file(path)
    with pytest.raises(CacheBlendError):
        dataset_info("nope")
    with pytest.raises(CacheBlendError):
        find_data_dir(tmp_path / "missing")


def test_truncation_with_the_engine_tokenizer(loaded, data_dir):
    tokenizer = loaded.tokenizer
    dataset = load_dataset("musique", data_dir=data_dir, limit=2, passages=2, passage_tokens=64,
                           tokenizer=tokenizer)
    for doc in (d for e in dataset.examples for d in e.documents):
        assert len(tokenizer(doc, add_special_tokens=False)["input_ids"]) <= 66
    assert truncate_text("short text", tokenizer, 64) == "short text"


def test_samsum_truncation_cuts_the_dialogue_and_keeps_the_summary(loaded, data_dir):
    tokenizer = loaded.tokenizer
    dataset = load_dataset("samsum", data_dir=data_dir, limit=3, passage_tokens=24,
                           tokenizer=tokenizer)
    whole = load_dataset("samsum", data_dir=data_dir, limit=3)
    for short, full in zip(dataset.examples, whole.examples, strict=True):
        for cut, shot in zip(short.documents, full.documents, strict=True):
            summary = shot.rpartition("\nSummary: ")[2]
            assert cut.endswith("\nSummary: " + summary)
            dialogue = cut.rpartition("\nSummary: ")[0]
            assert len(tokenizer(dialogue, add_special_tokens=False)["input_ids"]) <= 26
    # --passages 0 means the dataset's default number of shots, and says so.
    assert load_dataset("samsum", data_dir=data_dir, limit=1, passages=0).passages == 6
