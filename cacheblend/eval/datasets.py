"""Evaluation data: the raw files under a data directory -> ``Example`` lists.

Datasets (see ``SOURCES.md`` in the data directory for provenance and label caveats):
  musique     musique/musique_s.json          multi-hop QA, F1
  2wikimqa    2wikimqa/wikimqa_s_clean.json   multi-hop QA, F1 (answers: list of alias lists)
  multi_news  multi_news/multi_news.jsonl     multi-document summary, Rouge-L; the context is
                                              split into its "Passage N:" documents
  samsum      samsum/test.jsonl (+ validation.jsonl)  dialogue summary, Rouge-L, few-shot: the
              chunks are validation (dialogue, summary) pairs, the query a test dialogue; the
              validation dialogues that also occur in test are never used as shots
Any JSON list in the common format ``[{question, answers, ctxs: [{title, text}]}]`` loads with
``load_common_file`` (``--data FILE``).

The raw data is read where it lies, never copied into the project.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from cacheblend.errors import CacheBlendError

# kind -> the metric the task is scored with
TASK_METRIC = {"qa": "f1", "news": "rouge_l", "dialogue": "rouge_l"}


@dataclass(frozen=True)
class Example:
    id: str
    kind: str  # "qa" | "news" | "dialogue": picks the prompt and the metric
    query: str  # the question, the dialogue to summarise, or "" (news)
    documents: tuple[str, ...]  # the chunks, in prompt order
    answers: tuple[str, ...]  # gold answers / reference summaries

    @property
    def metric(self) -> str:
        return TASK_METRIC[self.kind]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    files: tuple[str, ...]  # relative to the data directory; the first is the examples
    kind: str
    passages: int | None  # default chunks per example (None: all)
    passage_tokens: int | None  # default truncation of each chunk (None: none)


DATASETS = {
    "musique": DatasetInfo("musique", ("musique/musique_s.json",), "qa", 6, None),
    "2wikimqa": DatasetInfo("2wikimqa", ("2wikimqa/wikimqa_s_clean.json",), "qa", 6, None),
    "multi_news": DatasetInfo("multi_news", ("multi_news/multi_news.jsonl",), "news", None, 512),
    "samsum": DatasetInfo("samsum", ("samsum/test.jsonl", "samsum/validation.jsonl"),
                          "dialogue", 6, None),
}
ALIASES = {"wikimqa": "2wikimqa", "2wiki": "2wikimqa", "multinews": "multi_news",
           "multi-news": "multi_news"}


def dataset_info(name: str) -> DatasetInfo:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise CacheBlendError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} "
                              "(or pass --data FILE in the common format)")
    return DATASETS[key]


def default_data_dirs(cwd: Path | None = None) -> list[Path]:
    """Where the raw data is looked for: ../shared/data/raw from the CWD, then the same path
    next to the repository (the repo root's parent / shared/data/raw)."""
    cwd = cwd or Path.cwd()
    repo_root = Path(__file__).resolve().parents[2]
    return [cwd.parent / "shared" / "data" / "raw", repo_root.parent / "shared" / "data" / "raw"]


def find_data_dir(data_dir: str | Path | None = None) -> Path:
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise CacheBlendError(f"data directory {path} does not exist")
        return path
    for path in default_data_dirs():
        if path.is_dir():
            return path
    raise CacheBlendError("no data directory found (looked for ../shared/data/raw); "
                          "pass --data-dir DIR or --data FILE")


# --- loaders: file(s) -> examples --------------------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CacheBlendError(f"cannot read {path}: {exc}") from exc


def _read_jsonl(path: Path) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    except (OSError, ValueError) as exc:
        raise CacheBlendError(f"cannot read {path}: {exc}") from exc


def _flatten_answers(answers) -> tuple[str, ...]:
    """musique: [str]; 2wikimqa: [[str]] (aliases per answer); a bare string also works."""
    if isinstance(answers, str):
        return (answers,)
    out: list[str] = []
    for answer in answers:
        out.extend(_flatten_answers(answer))
    return tuple(out)


def _ctx_text(ctx) -> str:
    if isinstance(ctx, str):
        return ctx
    title, text = (ctx.get("title") or "").strip(), (ctx.get("text") or "").strip()
    return f"{title}\n{text}" if title else text


def _check_row(row, where: str) -> None:
    """A row of the common format, or a CacheBlendError saying which field is wrong and how."""
    if not isinstance(row, dict):
        raise CacheBlendError(f"{where} is {type(row).__name__}, not an object "
                              "{question, answers, ctxs}")
    missing = [k for k in ("question", "answers", "ctxs") if k not in row]
    if missing:
        raise CacheBlendError(f"{where} has no {', '.join(missing)}; each row needs "
                              "question, answers and ctxs")
    if not isinstance(row["question"], str) or not row["question"].strip():
        raise CacheBlendError(f"{where}: question must be a non-empty string")
    answers, ctxs = row["answers"], row["ctxs"]
    if isinstance(answers, str) and answers.strip().startswith("["):
        raise CacheBlendError(f"{where}: answers is a string that looks like a list "
                              f"({answers[:40]!r}); write it as a JSON list of strings")
    if not isinstance(answers, str) and not _strings(answers):
        raise CacheBlendError(f"{where}: answers must be a string or a JSON list of strings "
                              "(or of lists of aliases)")
    if not isinstance(ctxs, list):
        raise CacheBlendError(f"{where}: ctxs is {type(ctxs).__name__}, not a JSON list of "
                              "passages ({title, text} objects or strings)")
    for number, ctx in enumerate(ctxs):
        ok = isinstance(ctx, str) or (isinstance(ctx, dict) and isinstance(ctx.get("text"), str)
                                      and isinstance(ctx.get("title", ""), str | None))
        if not ok:
            raise CacheBlendError(f"{where}: ctxs[{number}] must be a string or "
                                  "{title, text} with string values")


def _strings(value) -> bool:
    """A non-empty list of strings, or of lists of strings."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
        for v in value
    )


def load_common_file(path: str | Path, name: str | None = None) -> list[Example]:
    """``[{question, answers, ctxs: [{title, text}]}]`` -> QA examples, ids ``<name>-<index>``.
    Every row is checked first: a wrong field is an error naming the row and the field."""
    path = Path(path)
    rows = _read_json(path)
    if not isinstance(rows, list):
        raise CacheBlendError(f"{path}: expected a JSON list of {{question, answers, ctxs}}")
    if not rows:
        raise CacheBlendError(f"{path}: the list is empty")
    name = name or path.stem
    examples = []
    for index, row in enumerate(rows):
        _check_row(row, f"{path}: row {index}")
        examples.append(Example(
            id=f"{name}-{index}", kind="qa", query=row["question"].strip(),
            documents=tuple(_ctx_text(c) for c in row["ctxs"]),
            answers=_flatten_answers(row["answers"]),
        ))
    return examples


_PASSAGE_HEADER = re.compile(r"^Passage \d+:\n", re.MULTILINE)


def split_passages(context: str) -> list[str]:
    """LongBench multi_news context -> its "Passage N:" documents (headers dropped), with the
    Multi-News ``NEWLINE_CHAR`` markers turned back into newlines."""
    pieces = _PASSAGE_HEADER.split(context)
    docs = []
    for piece in pieces:
        text = re.sub(r"\s*NEWLINE_CHAR\s*", "\n", piece).strip()
        if text:
            docs.append(text)
    return docs


def load_multi_news(path: str | Path) -> list[Example]:
    return [
        Example(id=row.get("_id") or f"multi_news-{index}", kind="news", query="",
                documents=tuple(split_passages(row["context"])),
                answers=_flatten_answers(row["answers"]))
        for index, row in enumerate(_read_jsonl(Path(path)))
    ]


def _dialogue(text: str) -> str:
    return text.replace("\r\n", "\n").strip()


def samsum_shot_pool(test_path: str | Path, validation_path: str | Path
                     ) -> tuple[list[tuple[str, str]], int]:
    """Validation (dialogue, summary) pairs usable as shots, and how many were excluded
    because the same dialogue is also a test dialogue."""
    test_dialogues = {_dialogue(row["dialogue"]) for row in _read_jsonl(Path(test_path))}
    pool, excluded = [], 0
    for row in _read_jsonl(Path(validation_path)):
        dialogue = _dialogue(row["context"])
        if dialogue in test_dialogues:
            excluded += 1
            continue
        pool.append((dialogue, row["response"].strip()))
    return pool, excluded


SUMMARY_MARK = "\nSummary: "


def format_shot(dialogue: str, summary: str) -> str:
    return f"Dialogue:\n{dialogue}{SUMMARY_MARK}{summary}"


def truncate_shot(text: str, tokenizer, max_tokens: int) -> str:
    """A SAMSum shot with its dialogue cut to ``max_tokens`` tokens: its summary, the part a
    shot is there to show, is always kept whole."""
    dialogue, mark, summary = text.rpartition(SUMMARY_MARK)
    if not mark:
        return truncate_text(text, tokenizer, max_tokens)
    return truncate_text(dialogue, tokenizer, max_tokens) + mark + summary


def load_samsum(test_path: str | Path, validation_path: str | Path, shots: int = 6,
                seed: int = 0) -> list[Example]:
    """Test dialogues as queries; per example ``shots`` validation pairs drawn with a seeded RNG
    (the same seed and id always give the same shots)."""
    pool, _ = samsum_shot_pool(test_path, validation_path)
    examples = []
    for row in _read_jsonl(Path(test_path)):
        rng = random.Random(f"{seed}:{row['id']}")
        picked = rng.sample(pool, min(shots, len(pool)))
        examples.append(Example(
            id=f"samsum-{row['id']}", kind="dialogue", query=_dialogue(row["dialogue"]),
            documents=tuple(format_shot(d, s) for d, s in picked),
            answers=(row["summary"].strip(),),
        ))
    return examples


# --- selection and truncation ------------------------------------------------------------------


def truncate_text(text: str, tokenizer, max_tokens: int) -> str:
    """The text of the first ``max_tokens`` tokens of ``text`` (unchanged when shorter).

    This defines the document; the engine then tokenizes the document as it would any other.
    """
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=False).strip()


def prepare(examples: list[Example], passages: int | None = None,
            passage_tokens: int | None = None, tokenizer=None,
            truncate: Callable[[str, object, int], str] = truncate_text) -> list[Example]:
    """Keep the first ``passages`` documents and cut each to ``passage_tokens`` tokens."""
    if passage_tokens is not None and tokenizer is None:
        raise ValueError("passage_tokens needs a tokenizer")
    out = []
    for example in examples:
        docs = example.documents[:passages] if passages is not None else example.documents
        if passage_tokens is not None:
            docs = tuple(truncate(d, tokenizer, passage_tokens) for d in docs)
        out.append(replace(example, documents=tuple(docs)))
    return out


def select(examples: list[Example], limit: int | None = None, seed: int = 0,
           shuffle: bool = False, skip: int = 0) -> list[Example]:
    """``limit`` examples after the first ``skip``, in file order or in a seeded shuffled order
    (``skip`` leaves out the examples a setting was tuned on, say)."""
    examples = list(examples)
    if shuffle:
        random.Random(seed).shuffle(examples)
    return examples[skip : skip + limit] if limit is not None else examples[skip:]


@dataclass(frozen=True)
class LoadedDataset:
    name: str
    kind: str
    files: tuple[Path, ...]
    examples: list[Example]
    passages: int | None  # effective: chunks kept per example (None: all)
    passage_tokens: int | None  # effective truncation (None: none)


def load_dataset(name: str | None = None, data_file: str | Path | None = None,
                 data_dir: str | Path | None = None, passages: int | None = None,
                 passage_tokens: int | None = None, limit: int | None = None, seed: int = 0,
                 shuffle: bool = False, tokenizer=None, skip: int = 0) -> LoadedDataset:
    """A named dataset from the data directory, or ``data_file`` in the common format.

    ``passages`` / ``passage_tokens`` default to the dataset's own defaults (``DATASETS``);
    a value <= 0 means "all" / "no truncation".
    """
    truncate = truncate_text
    if data_file is not None:
        path = Path(data_file)
        info = DatasetInfo(name or path.stem, (str(path),), "qa", None, None)
        files = (path,)
        examples = load_common_file(path, info.name)
    else:
        info = dataset_info(name or "musique")
        root = find_data_dir(data_dir)
        files = tuple(root / f for f in info.files)
        for path in files:
            if not path.is_file():
                raise CacheBlendError(f"dataset {info.name}: {path} not found")
        if info.name == "samsum":
            passages = info.passages if passages is None or passages <= 0 else passages
            examples = load_samsum(files[0], files[1], shots=passages, seed=seed)
            truncate = truncate_shot
        elif info.name == "multi_news":
            examples = load_multi_news(files[0])
        else:
            examples = load_common_file(files[0], info.name)
    passages = info.passages if passages is None else (passages if passages > 0 else None)
    passage_tokens = (info.passage_tokens if passage_tokens is None
                      else (passage_tokens if passage_tokens > 0 else None))
    examples = select(examples, limit, seed, shuffle, skip)
    examples = prepare(examples, passages, passage_tokens, tokenizer, truncate)
    return LoadedDataset(info.name, info.kind, files, examples, passages, passage_tokens)
