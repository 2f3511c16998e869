"""The evaluation prompts, all in one place: one template per task kind.

In the spirit of the CacheBlend paper's prompts (an instruction, the passages, then the query),
written for this project. The layout is the engine's RAG layout:

    prefix = chat template head + system + instruction          (the same for every example)
    chunks = the passages, each tokenized alone                 (reused from the store)
    suffix = the query text + the generation prompt (+ the start of the reply, for SAMSum)

Passages carry no "Passage i" numbering: a chunk's tokens must not depend on where it sits, or
its cache entry could not be reused at another position.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from cacheblend.eval.datasets import Example
from cacheblend.eval.metrics import first_line
from cacheblend.prompt import PromptBuilder, Segments


@dataclass(frozen=True)
class TaskPrompt:
    system: str
    instruction: str  # before the passages
    query: str  # after the passages; ``{query}`` is the example's query
    max_tokens: int  # default decode length for the task
    answer_prefix: str = ""  # the start of the reply, part of the prompt; the model goes on
    min_tokens: int = 0  # end-of-sequence held back until the answer has this many tokens


PROMPTS = {
    "qa": TaskPrompt(
        system="You are a helpful assistant. You answer questions using the given passages.",
        instruction="Answer the question using the passages below. Some passages may be "
                    "irrelevant.",
        query="Question: {query}\nAnswer the question in a few words, with no explanation.",
        max_tokens=32,
    ),
    "news": TaskPrompt(
        system="You are a helpful assistant. You write concise news summaries.",
        instruction="Below are several news articles about one story.",
        query="Summarise the news articles above in one paragraph.",
        max_tokens=128,
    ),
    "dialogue": TaskPrompt(
        system="You are a helpful assistant. You summarise conversations.",
        instruction="Below are example dialogues, each followed by its summary.",
        # The dialogue before the instruction, the reply opened with the shots' label, and no
        # end of sequence right after it: otherwise the 135M model repeats the dialogue, or
        # writes the label and stops (3 of 8 test dialogues).
        query="Dialogue:\n{query}\n\nSummarise this dialogue in one sentence, like the "
              "summaries above.",
        max_tokens=64,
        answer_prefix="Summary:",
        min_tokens=4,
    ),
}


def build_segments(builder: PromptBuilder, example: Example) -> Segments:
    """The example's prompt as token-id segments (see the module docstring)."""
    prompt = PROMPTS[example.kind]
    head = f"{prompt.instruction}\n\n"
    messages = [
        {"role": "system", "content": prompt.system},
        {"role": "user", "content": head + prompt.query.format(query=example.query)},
    ]
    segments = builder.build_messages(messages, list(example.documents), question_prefix=head)
    if prompt.answer_prefix:
        segments = replace(segments,
                           suffix=segments.suffix + builder.user_ids(prompt.answer_prefix))
    return segments


def answer_text(kind: str, text: str) -> str:
    """The part of a generated answer that is scored: a QA answer's first line (how LongBench
    reads a chatty model), a summary's first paragraph."""
    if kind == "qa":
        return first_line(text)
    return text.strip().split("\n\n", 1)[0].strip()


def prompts_version(kind: str) -> str:
    """A short digest of the task's template: results from other prompts are never mixed, and
    editing one task's template leaves the other tasks' results valid."""
    text = repr((kind, PROMPTS[kind]))
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()
