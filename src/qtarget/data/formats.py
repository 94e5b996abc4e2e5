"""Row formats: which columns a dataset has, and one raw row -> a conversation or a prompt/response pair.

Formats, detected from the column names in this order:

| format | columns | becomes |
|---|---|---|
| `messages` | `messages`: `[{role, content}, ...]` (TRL conversational, OpenAI chat) | a conversation; every assistant turn supervised |
| `conversations` | `conversations`: `[{from, value}, ...]` (ShareGPT) | the same, roles human/user, gpt/assistant, system |
| `prompt_completion` | `prompt` + `completion` (TRL): strings, or lists of messages | strings: a prompt/response pair; lists: a conversation whose completion is supervised |
| `prompt_response` | `prompt` + `response` | a prompt/response pair |
| `alpaca` | `instruction` + `output` (+ optional `input`) | a prompt/response pair in the Alpaca prompt template |
| `text` | `text` | every token supervised |

A message's `content` may be a string, null (empty text) or a list of OpenAI content parts
(`{"type": "text", "text": ...}`, or the Responses API's `input_text` / `output_text`, concatenated in
order); any other part type is an error naming the row, turn and part. An assistant turn with `tool_calls` is refused: chat templates differ in whether
they render tool calls, so supervising it could silently train on an empty reply.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

FORMATS = ("messages", "conversations", "prompt_completion", "prompt_response", "alpaca", "text")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system"}

TEXT_PARTS = ("text", "input_text", "output_text")  # OpenAI chat and Responses API text parts

# The Stanford Alpaca prompt (tatsu-lab/stanford_alpaca, train.py), with and without an input.
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
# Formats whose prompt/response pairs go through the tokenizer's chat template by default (LLaMA-Factory
# templates Alpaca rows with the model's template; TRL does not template a plain-string prompt/completion).
TEMPLATED_BY_DEFAULT = ("alpaca",)


@dataclass
class Conversation:
    """Chat turns for the tokenizer's chat template. `prompt_turns` None: every assistant turn is
    supervised; an int n: everything after the first n turns (rendered with the generation prompt)."""

    messages: list[dict[str, str]]
    prompt_turns: int | None = None


@dataclass
class PromptResponse:
    prompt: str
    response: str


@dataclass
class Text:
    text: str


def detect_format(columns: Sequence[str]) -> str:
    """The row format of a dataset from its column names (see the module docstring)."""
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "conversations"
    if "prompt" in cols and "completion" in cols:
        return "prompt_completion"
    if "prompt" in cols and "response" in cols:
        return "prompt_response"
    if "instruction" in cols and "output" in cols:
        return "alpaca"
    if "prompt" in cols:
        raise ValueError("dataset has a 'prompt' column but no 'response' or 'completion' column: "
                         "prompt rows need one of them")
    if "response" in cols or "completion" in cols:
        have = "response" if "response" in cols else "completion"
        raise ValueError(f"dataset has a {have!r} column but no 'prompt' column: {have} rows need both")
    if "instruction" in cols or "output" in cols:
        raise ValueError("dataset has an Alpaca column but not both 'instruction' and 'output' (input is optional)")
    if "text" in cols:
        return "text"
    raise ValueError(f"dataset columns {sorted(cols)} have none of the supported formats: 'messages' (chat turns), "
                     f"'conversations' (ShareGPT), 'prompt' + 'completion' (TRL), 'prompt' + 'response', "
                     f"'instruction' + 'output' (Alpaca) or 'text'")


def require(row: Mapping[str, Any], column: str, index: int, kind: type | tuple = str) -> Any:
    value = row.get(column)
    if value is None:
        raise ValueError(f"row {index}: missing value in column {column!r}")
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"row {index}: column {column!r} must be {expected}, got {type(value).__name__}")
    return value


def content_text(content: Any, where: str) -> str:
    """A message's content as text: a string, None (empty) or OpenAI text parts (concatenated)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"{where}: 'content' must be a string, null or a list of text parts, "
                         f"got {type(content).__name__}")
    pieces = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            shown = kind if kind is not None else type(part).__name__
            raise ValueError(f"{where}, content part {k}: only text parts ({{'type': 'text', 'text': ...}}) can be "
                             f"trained on, got {shown!r}")
        pieces.append(part["text"])
    return "".join(pieces)


def chat_turns(turns: Any, index: int, column: str, *, sharegpt: bool = False) -> list[dict[str, str]]:
    """A list of turns -> [{"role", "content": str}]; ShareGPT `from`/`value` turns get standard roles."""
    if not isinstance(turns, (list, tuple)) or not turns:
        raise ValueError(f"row {index}: column {column!r} must be a non-empty list of turns")
    out = []
    for j, m in enumerate(turns):
        where = f"row {index}, {column}[{j}]"
        if not isinstance(m, Mapping):
            raise ValueError(f"{where}: a turn must be a dict, got {type(m).__name__}")
        if sharegpt and m.get("from") is not None:
            speaker = str(m["from"])
            if speaker.lower() not in SHAREGPT_ROLES:
                raise ValueError(f"{where}: unknown ShareGPT speaker {speaker!r}; expected one of "
                                 f"{', '.join(SHAREGPT_ROLES)}")
            role, content = SHAREGPT_ROLES[speaker.lower()], m.get("value")
        elif m.get("role") is not None:
            role, content = str(m["role"]), m.get("content")
        else:
            keys = "'from' and 'value'" if sharegpt else "'role' and 'content'"
            raise ValueError(f"{where}: a turn needs {keys}, got keys {sorted(m)}")
        if role == "assistant" and m.get("tool_calls"):
            raise ValueError(f"{where}: an assistant turn with 'tool_calls' cannot be trained on (chat templates "
                             f"differ in rendering tool calls); put the call in 'content' or drop the turn")
        out.append({"role": role, "content": content_text(content, where)})
    return out


def normalize_row(row: Mapping[str, Any], fmt: str, index: int, *, chat_template: bool = False
                  ) -> Conversation | PromptResponse | Text:
    """One raw row of format `fmt` -> what the tokeniser needs. With `chat_template` (resolved per format by
    `qtarget.data.reading.templates_pairs`), prompt/response pairs (prompt_response, standard
    prompt_completion, alpaca: instruction + "\\n" + input) become a user and an assistant turn."""
    if fmt in ("messages", "conversations"):
        messages = chat_turns(row.get(fmt), index, fmt, sharegpt=fmt == "conversations")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"row {index}: {fmt!r} has no assistant turn to train on")
        return Conversation(messages)
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, (list, tuple)) or isinstance(completion, (list, tuple)):
            if not isinstance(prompt, (list, tuple)) or not isinstance(completion, (list, tuple)):
                raise ValueError(f"row {index}: 'prompt' and 'completion' must both be strings or both be lists "
                                 f"of messages, got {type(prompt).__name__} and {type(completion).__name__}")
            p = chat_turns(prompt, index, "prompt")
            return Conversation(p + chat_turns(completion, index, "completion"), prompt_turns=len(p))
        pair = PromptResponse(require(row, "prompt", index), require(row, "completion", index))
    elif fmt == "prompt_response":
        pair = PromptResponse(require(row, "prompt", index), require(row, "response", index))
    elif fmt == "alpaca":
        instruction, extra = require(row, "instruction", index), row.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError(f"row {index}: column 'input' must be str, got {type(extra).__name__}")
        output = require(row, "output", index)
        if chat_template:
            pair = PromptResponse(instruction + (f"\n{extra}" if extra.strip() else ""), output)  # LLaMA-Factory
        elif extra.strip():
            pair = PromptResponse(ALPACA_PROMPT.format(instruction=instruction, input=extra), output)
        else:
            pair = PromptResponse(ALPACA_PROMPT_NO_INPUT.format(instruction=instruction), output)
    elif fmt == "text":
        return Text(require(row, "text", index))
    else:
        raise ValueError(f"unknown row format {fmt!r}; valid: {', '.join(FORMATS)}")
    if chat_template:
        return Conversation([{"role": "user", "content": pair.prompt}, {"role": "assistant", "content": pair.response}])
    return pair
