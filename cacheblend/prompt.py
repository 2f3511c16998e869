"""Request -> segments (prefix | chunk 1 | ... | chunk n | suffix) as token ids.

Each segment is tokenized alone and the prompt is the concatenation of the id lists: a chunk's
ids are the same wherever it appears, so its cache entry can be found and reused. Text never goes
back through the tokenizer after it is split. The chat template decides where segments sit: it is
rendered once with placeholders, and split at them. User text (documents, question) is tokenized
with special-token parsing off, so a document cannot inject control tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

DOCS_MARK = "\x00CACHEBLEND_DOCUMENTS\x00"
QUESTION_MARK = "\x00CACHEBLEND_QUESTION\x00"
CHUNK_END = "\n\n"


@dataclass(frozen=True)
class Segments:
    prefix: tuple[int, ...]
    chunks: tuple[tuple[int, ...], ...]
    suffix: tuple[int, ...]

    @property
    def ids(self) -> list[int]:
        out = list(self.prefix)
        for chunk in self.chunks:
            out.extend(chunk)
        out.extend(self.suffix)
        return out

    @property
    def num_tokens(self) -> int:
        return len(self.prefix) + sum(len(c) for c in self.chunks) + len(self.suffix)

    def chunk_spans(self) -> list[tuple[int, int]]:
        """(start, end) positions of each chunk in the prompt."""
        spans, start = [], len(self.prefix)
        for chunk in self.chunks:
            spans.append((start, start + len(chunk)))
            start += len(chunk)
        return spans


class PromptBuilder:
    """Turns (system, instruction, documents, question) or separator-split text into Segments."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def template_ids(self, text: str) -> tuple[int, ...]:
        """Tokenize template text: special-token strings become control tokens."""
        if not text:
            return ()
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def user_ids(self, text: str) -> tuple[int, ...]:
        """Tokenize user text: special-token strings stay plain text."""
        if not text:
            return ()
        return tuple(
            self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        )

    def chunk_ids(self, document: str) -> tuple[int, ...]:
        return self.user_ids(document.strip() + CHUNK_END)

    def render(self, messages: list[dict]) -> str:
        if self.has_template:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        lines = [m["content"] for m in messages]
        return "\n\n".join(lines) + "\nAnswer:"

    def build(self, system: str | None, instruction: str, documents: list[str],
              question: str) -> Segments:
        """prefix = template head + system + instruction; chunks = documents; suffix = question
        + the rest of the template (generation prompt)."""
        user = f"{instruction}\n\n" if instruction else ""
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user + "Question: " + question})
        return self.build_messages(messages, documents, question_prefix=user)

    def build_chat(self, messages: list[dict], documents: list[str], system: str | None,
                   instruction: str) -> Segments:
        """A chat conversation with retrieved documents, laid out as ``build`` lays out a RAG
        prompt (the system prompt added when the conversation has none; the instruction opening
        the last user message), so its prefix is the one documents are precomputed after."""
        if not documents:
            return self.build_messages(messages, [])
        conversation = [dict(m) for m in messages]
        if conversation[0]["role"] != "system" and system:
            conversation.insert(0, {"role": "system", "content": system})
        head = f"{instruction}\n\n" if instruction else ""
        last_user = max(i for i, m in enumerate(conversation) if m["role"] == "user")
        conversation[last_user]["content"] = head + conversation[last_user]["content"]
        return self.build_messages(conversation, documents, question_prefix=head)

    def build_messages(self, messages: list[dict], documents: list[str],
                       question_prefix: str = "") -> Segments:
        """A chat conversation with documents placed at the start of the last user message,
        after ``question_prefix`` (text of that message that precedes the documents).

        Everything before the documents is the prefix; the rest of the last user message and
        the generation prompt are the suffix.
        """
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"),
                        default=None)
        if last_user is None:
            raise ValueError("a conversation needs at least one user message")
        content = messages[last_user]["content"]
        if question_prefix and content.startswith(question_prefix):
            head, question = question_prefix, content[len(question_prefix):]
        else:
            head, question = "", content
        marked = [dict(m) for m in messages]
        marked[last_user]["content"] = f"{head}{DOCS_MARK}{QUESTION_MARK}"
        text = self.render(marked)
        before, tail = text.split(DOCS_MARK)
        between, after = tail.split(QUESTION_MARK)
        prefix_text, head_text = (before[: len(before) - len(head)], head) if head else (before, "")
        suffix = self.template_ids(between) + self.user_ids(question) + self.template_ids(after)
        return Segments(
            prefix=self.template_ids(prefix_text) + self.user_ids(head_text),
            chunks=tuple(self.chunk_ids(d) for d in documents),
            suffix=suffix,
        )

    def split_by_separator(self, text: str, separator: str) -> Segments:
        """LMCache-style: ``prefix SEP chunk SEP ... SEP suffix``; each piece tokenized alone.

        The text is rendered template text (control tokens parsed); with no separator in it the
        whole text is the suffix.
        """
        pieces = text.split(separator)
        if len(pieces) == 1:
            return Segments(prefix=(), chunks=(), suffix=self.template_ids(text))
        return Segments(
            prefix=self.template_ids(pieces[0]),
            chunks=tuple(self.template_ids(p) for p in pieces[1:-1] if p),
            suffix=self.template_ids(pieces[-1]),
        )
