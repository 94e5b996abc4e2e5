"""A conversation -> token ids and a mask of the supervised tokens.

The chat template renders the conversation to text; the supervised parts are character spans of that
text (each assistant turn, from the end of the generation prompt before it to the end of its rendered
turn, end-of-turn marker included). Tokens are then chosen so that no token crosses a span edge:

1. the whole text is tokenised, and if the text up to every span edge tokenises to a prefix of it, that
   tokenisation is kept (the usual case: exactly what the model sees at inference);
2. otherwise a BPE merge crosses an edge (e.g. a reply that starts with a blank line after the
   template's "assistant\\n"): the text is tokenised piece by piece between edges, so the prompt is
   tokenised as it is at generation time and the reply starts on its own token. This is kept if it
   decodes to the same text as the whole tokenisation;
3. otherwise the row cannot be tokenised here (`UntokenizableRow`: skipped and counted, or refused
   with `strict_rows`).
"""
from __future__ import annotations

from jinja2.exceptions import TemplateError

from qtarget.data.formats import Conversation


class UntokenizableRow(ValueError):
    """A well-formed row that cannot be tokenised with supervised spans (skipped unless strict)."""


def render(tokenizer, messages: list[dict], *, generation_prompt: bool, index: int) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as e:
        raise UntokenizableRow(f"row {index}: the chat template refused the conversation ({e})") from None


def _prefix_end(tokenizer, full: str, messages: list[dict], *, generation_prompt: bool, index: int,
                what: str) -> int:
    """Length of the rendered `messages` inside `full`; they must render to a prefix of it."""
    if not messages:  # a reply that opens the conversation: it starts where its content starts
        return _opening_reply_start(tokenizer, full)
    text = render(tokenizer, messages, generation_prompt=generation_prompt, index=index)
    if not full.startswith(text):
        raise UntokenizableRow(f"row {index}: the chat template is not prefix-stable: the conversation rendered "
                               f"{what} is not a prefix of the whole conversation, so the reply cannot be located "
                               f"(use response_only=False, or a template that renders earlier turns unchanged)")
    return len(text)


SENTINEL = "\u2063qtarget-reply\u2063"  # invisible separators around a marker no real reply contains


def _opening_reply_start(tokenizer, full: str) -> int:
    """Where the content of a first-turn assistant reply starts in `full`: the template's text before it
    (a default system prompt, the turn header) is prompt. Found by rendering the turn with a sentinel."""
    try:
        probe = tokenizer.apply_chat_template([{"role": "assistant", "content": SENTINEL}], tokenize=False)
    except Exception:  # noqa: BLE001 - a probe: a template may refuse an assistant-first conversation
        return 0
    start = probe.find(SENTINEL)
    return start if start >= 0 and full.startswith(probe[:start]) else 0


def supervised_spans(tokenizer, conversation: Conversation, index: int, *, response_only: bool = True
                     ) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, character spans to supervise: the replies, or everything without response_only)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat rows need a tokenizer with a chat template (tokenizer.chat_template is None); "
                         "use prompt/response rows without chat_template, or set tokenizer.chat_template")
    messages = conversation.messages
    full = render(tokenizer, messages, generation_prompt=False, index=index)
    if not response_only:
        return full, [(0, len(full))]
    if conversation.prompt_turns is not None:
        n = conversation.prompt_turns
        start = _prefix_end(tokenizer, full, messages[:n], generation_prompt=True, index=index,
                            what="up to the completion")
        return full, [(start, len(full))]
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _prefix_end(tokenizer, full, messages[:i], generation_prompt=True, index=index,
                            what=f"up to assistant turn {i}")
        end = _prefix_end(tokenizer, full, messages[: i + 1], generation_prompt=False, index=index,
                          what=f"through assistant turn {i}")
        if end > start:
            spans.append((start, end))
    return full, spans


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def tokenize_spans(tokenizer, text: str, spans: list[tuple[int, int]], index: int
                   ) -> tuple[list[int], list[bool], bool]:
    """(ids, supervised mask, split) for `text` with the character `spans` supervised; `split` is True
    when the text had to be tokenised piece by piece (a merge across a span edge)."""
    edges = sorted({e for span in spans for e in span if 0 < e < len(text)} | {0, len(text)})
    full = _ids(tokenizer, text)
    counts = []
    for e in edges[1:-1]:
        prefix = _ids(tokenizer, text[:e])
        if full[: len(prefix)] != prefix:
            break
        counts.append(len(prefix))
    else:
        bounds = [0, *counts, len(full)]
        return full, _mask(edges, bounds, spans), False
    pieces = [_ids(tokenizer, text[a:b]) for a, b in zip(edges, edges[1:])]
    ids = [t for piece in pieces for t in piece]
    if _decode(tokenizer, ids) != _decode(tokenizer, full):
        raise UntokenizableRow(f"row {index}: a token merges across the prompt/response boundary and the parts do "
                               f"not tokenise on their own to the same text, so the reply cannot be masked")
    bounds = [0]
    for piece in pieces:
        bounds.append(bounds[-1] + len(piece))
    return ids, _mask(edges, bounds, spans), True


def _mask(edges: list[int], bounds: list[int], spans: list[tuple[int, int]]) -> list[bool]:
    """Token runs bounds[k]:bounds[k+1] cover the characters edges[k]:edges[k+1]; supervised if inside a span."""
    mask: list[bool] = []
    for k in range(len(edges) - 1):
        inside = any(a <= edges[k] and edges[k + 1] <= b for a, b in spans)
        mask += [inside] * (bounds[k + 1] - bounds[k])
    return mask
