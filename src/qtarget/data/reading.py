"""How every command reads a dataset: one default for the chat template, decided per row format.

`qtarget train`, `profile`, `teacher-cache`, `lab` (on your data) and `eval` (on a data file) all turn a
row into tokens through `qtarget.data.tokenize.tokenize_row`, with `chat_template` meaning the same:

| format | `chat_template` auto (the default) | the ecosystem's convention |
|---|---|---|
| `messages`, `conversations`, `prompt`/`completion` as message lists | the tokenizer's chat template | TRL, ShareGPT, OpenAI chat: conversational rows are templated |
| `prompt`/`completion` strings, `prompt`/`response` | no template: prompt + completion + eos | TRL's standard prompt-completion is not templated |
| `instruction`/`output` (Alpaca) | the tokenizer's chat template, user turn = instruction + "\\n" + input; the Stanford Alpaca prompt when the tokenizer has no template | LLaMA-Factory templates Alpaca rows with the model's template |
| `text` | never | plain language modelling |

`chat_template=True` puts every prompt/response pair through the template; `False` none (conversational
rows always go through it: they have no other rendering).
"""
from __future__ import annotations

from typing import Any, Sequence

from qtarget.cli_args import parse_bool
from qtarget.data.formats import TEMPLATED_BY_DEFAULT

AUTO_WORDS = ("auto", "none", "null", "~", "")


def parse_chat_template(value: Any, flag: str = "--chat_template") -> bool | None:
    """A chat_template setting from the API, YAML or a flag: None / "auto" -> None (per format, the
    default), a bool or true/false -> that bool."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in AUTO_WORDS:
        return None
    try:
        return parse_bool(text)
    except ValueError:
        raise ValueError(f"{flag}: expected auto, true or false, got {value!r}") from None


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def templates_pairs(fmt: str, choice: bool | None, tokenizer: Any) -> bool:
    """Whether prompt/response pairs of format `fmt` go through the chat template (see the table above)."""
    if choice is not None:
        return bool(choice)
    return fmt in TEMPLATED_BY_DEFAULT and has_chat_template(tokenizer)


def describe_reading(fmt: str, templated_rows: int, rows: int) -> str:
    """The format and template part of a data report line, e.g. 'prompt_completion, no chat template'."""
    if fmt == "text":
        how = "plain text, no chat template"
    elif templated_rows == rows:
        how = "the tokenizer's chat template"
    elif templated_rows == 0:
        how = "no chat template: prompt + response + eos"
    else:
        how = f"the tokenizer's chat template on {templated_rows} of {rows} rows"
    return f"{fmt}, {how}"


def prompt_prefix(example: dict[str, Sequence[int]]) -> list[int]:
    """The tokens before the last supervised run of a tokenised example (its last reply): exactly what the
    model is given when it is asked for that reply, so generation reads the tokens training read."""
    labels = list(example["labels"])
    starts = [t for t, lab in enumerate(labels) if lab != -100 and (t == 0 or labels[t - 1] == -100)]
    if not starts or starts[-1] == 0:
        raise ValueError("the example has no prompt before its supervised tokens (response_only=False?)")
    return list(example["input_ids"][:starts[-1]])
