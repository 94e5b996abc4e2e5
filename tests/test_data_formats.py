"""Every supported row format, on the real SmolLM2 and GPT-2 tokenizers: the supervised tokens decode to
exactly the reply text (+ the end-of-turn / eos the format gives), and the whole row decodes to the text
the template (or prompt format) renders. Also the prompt/response boundary and untokenisable rows."""
from __future__ import annotations

import copy
import json

import pytest

from qtarget.data import prepare_data
from qtarget.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, detect_format
from qtarget.data.tokenize import IGNORE_INDEX, TokenizeOptions, tokenize_row, tokenize_rows

# GPT-2 has no chat template: a plain-text one, with eos ending each reply and "\n" starting it (so a
# reply that starts with a newline merges with the prompt under GPT-2's BPE, like ChatML on SmolLM2).
GPT2_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] }}{% if m['role'] == 'assistant' %}"
                 "{{ '<|endoftext|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}")
END_OF_TURN = {"smollm2": "<|im_end|>\n", "gpt2": "<|endoftext|>\n"}
EOS = {"smollm2": "<|im_end|>", "gpt2": "<|endoftext|>"}


@pytest.fixture(params=["smollm2", "gpt2"])
def tok(request, smollm2_tokenizer, gpt2_tokenizer):
    if request.param == "smollm2":
        return "smollm2", smollm2_tokenizer
    t = copy.deepcopy(gpt2_tokenizer)
    t.chat_template = GPT2_TEMPLATE
    return "gpt2", t


def supervised_runs(tokenizer, ex) -> list[str]:
    """The supervised tokens, decoded per contiguous run."""
    runs, cur = [], []
    for t, lab in zip(ex["input_ids"], ex["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in runs]


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def one(tokenizer, row, **options):
    fmt = detect_format(list(row))
    ex = tokenize_row(tokenizer, row, fmt, TokenizeOptions(max_length=None, **options))
    assert ex is not None
    return fmt, ex


SYSTEM = {"role": "system", "content": "You are terse."}
CHAT_CASES = {
    # name: (row, the conversation as plain {role, content} turns, the replies supervised)
    "messages multi-turn": (
        {"messages": [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there!"},
                      {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is 4."}]},
        [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there!"},
         {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is 4."}],
        ["Hello there!", "It is 4."]),
    "messages content parts": (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Add "}, {"type": "input_text", "text": "2 and 3."}]},
                      {"role": "assistant", "content": [{"type": "output_text", "text": "5"}]}]},
        [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}],
        ["5"]),
    "messages content null": (
        {"messages": [{"role": "system", "content": None}, {"role": "user", "content": "Say yes."},
                      {"role": "assistant", "content": "yes"}]},
        [{"role": "system", "content": ""}, {"role": "user", "content": "Say yes."},
         {"role": "assistant", "content": "yes"}],
        ["yes"]),
    "sharegpt": (
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name a colour."},
                           {"from": "gpt", "value": "Blue."}, {"from": "human", "value": "Another?"},
                           {"from": "gpt", "value": "Red."}]},
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
         {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
         {"role": "assistant", "content": "Red."}],
        ["Blue.", "Red."]),
    "trl conversational prompt/completion": (
        {"prompt": [SYSTEM, {"role": "user", "content": "Capital of France?"}],
         "completion": [{"role": "assistant", "content": "Paris."}]},
        [SYSTEM, {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
        ["Paris."]),
    "blank line reply": (
        {"messages": [{"role": "user", "content": "Write a poem."},
                      {"role": "assistant", "content": "\n\nRoses are red,\nviolets are blue."}]},
        [{"role": "user", "content": "Write a poem."},
         {"role": "assistant", "content": "\n\nRoses are red,\nviolets are blue."}],
        ["\n\nRoses are red,\nviolets are blue."]),
    "assistant opens the conversation": (  # the template's default system prompt and turn header are prompt
        {"messages": [{"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "Hello."}]},
        [{"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "Hello."}],
        ["Welcome!", "Hello."]),
    "reply with leading spaces": (
        {"messages": [{"role": "user", "content": "Indent it."}, {"role": "assistant", "content": "   x = 1"}]},
        [{"role": "user", "content": "Indent it."}, {"role": "assistant", "content": "   x = 1"}],
        ["   x = 1"]),
}


@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_chat_formats_supervise_exactly_the_replies(tok, case):
    name, tokenizer = tok
    row, turns, replies = CHAT_CASES[case]
    _, ex = one(tokenizer, row)
    # the row is the conversation the template renders, token for token in text
    assert decode(tokenizer, ex["input_ids"]) == tokenizer.apply_chat_template(turns, tokenize=False)
    assert supervised_runs(tokenizer, ex) == [r + END_OF_TURN[name] for r in replies]


def test_chat_formats_without_response_only_supervise_everything(tok):
    _, tokenizer = tok
    _, ex = one(tokenizer, CHAT_CASES["sharegpt"][0], response_only=False)
    assert ex["labels"] == ex["input_ids"]


PLAIN_CASES = {
    # name: (row, prompt text, response text)
    "trl standard prompt/completion": ({"prompt": "The sky is", "completion": " blue."}, "The sky is", " blue."),
    "prompt/response": ({"prompt": "Q: 2+2?\nA:", "response": " 4"}, "Q: 2+2?\nA:", " 4"),
    "alpaca with input": ({"instruction": "Translate to French.", "input": "cat", "output": "chat"},
                          ALPACA_PROMPT.format(instruction="Translate to French.", input="cat"), "chat"),
    "alpaca empty input": ({"instruction": "Say hi.", "input": "", "output": "Hi!"},
                           ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi."), "Hi!"),
    "alpaca no input column": ({"instruction": "Say hi.", "output": "Hi!"},
                               ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi."), "Hi!"),
    "response starting with blank lines": ({"prompt": "Poem:\n", "response": "\n\nRoses."}, "Poem:\n", "\n\nRoses."),
}


@pytest.mark.parametrize("case", list(PLAIN_CASES))
def test_prompt_response_formats_supervise_the_response_and_eos(tok, case):
    name, tokenizer = tok
    row, prompt, response = PLAIN_CASES[case]
    _, ex = one(tokenizer, row, chat_template=False)  # Alpaca rows go through the template by default
    assert decode(tokenizer, ex["input_ids"]) == prompt + response + EOS[name]
    assert supervised_runs(tokenizer, ex) == [response + EOS[name]]
    n_prompt = ex["labels"].index(next(t for t in ex["labels"] if t != IGNORE_INDEX))
    assert decode(tokenizer, ex["input_ids"][:n_prompt]) == prompt


@pytest.mark.parametrize("case", ["trl standard prompt/completion", "alpaca with input"])
def test_prompt_response_formats_through_the_chat_template(tok, case):
    name, tokenizer = tok
    row, _, response = PLAIN_CASES[case]
    _, ex = one(tokenizer, row, chat_template=True)
    user = row.get("prompt") or f"{row['instruction']}\n{row['input']}"  # joined as LLaMA-Factory joins them
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    assert decode(tokenizer, ex["input_ids"]) == tokenizer.apply_chat_template(turns, tokenize=False)
    assert supervised_runs(tokenizer, ex) == [response + END_OF_TURN[name]]


def test_every_format_trains_from_a_jsonl_file(tmp_path, smollm2_tokenizer):
    """Through the loader too (datasets' JSON reader keeps lists of parts, nulls and mixed content)."""
    rows = [CHAT_CASES[c][0] for c in CHAT_CASES if "prompt" not in CHAT_CASES[c][0]]
    messages = [r for r in rows if "messages" in r]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in messages))
    data = prepare_data(str(path), smollm2_tokenizer, max_length=None)
    assert data.report.format == "messages" and data.report.examples == len(messages)
    assert data.report.split_at_boundary >= 1  # the blank-line reply
    for fmt, group in [("conversations", [CHAT_CASES["sharegpt"][0]]),
                       ("prompt_completion", [CHAT_CASES["trl conversational prompt/completion"][0]]),
                       ("alpaca", [PLAIN_CASES["alpaca with input"][0], PLAIN_CASES["alpaca empty input"][0]])]:
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in group))
        report = prepare_data(str(path), smollm2_tokenizer, max_length=None).report
        assert report.format == fmt and report.examples == len(group)


def test_blank_line_reply_tokenises_the_prompt_as_at_generation_time(smollm2_tokenizer):
    """The reply's first newlines would merge with the template's "assistant\\n" into one token: the prompt
    is tokenised on its own instead, exactly as `add_generation_prompt=True` gives it at inference."""
    tok = smollm2_tokenizer
    turns = CHAT_CASES["blank line reply"][1]
    _, ex = one(tok, {"messages": turns})
    prompt_ids = tok(tok.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][: len(prompt_ids)] == prompt_ids
    assert all(lab == IGNORE_INDEX for lab in ex["labels"][: len(prompt_ids)])
    assert all(lab != IGNORE_INDEX for lab in ex["labels"][len(prompt_ids):])
    whole = tok(tok.apply_chat_template(turns, tokenize=False), add_special_tokens=False)["input_ids"]
    assert whole[: len(prompt_ids)] != prompt_ids  # the merge this guards against is real on this tokenizer


def test_blank_line_dataset_trains_end_to_end(tmp_path, smollm2_tokenizer, tiny_model):
    """The issue's case: replies starting with a blank line (row 5 and others) in a chat dataset."""
    from qtarget.training import QTargetConfig, train

    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": ("\n\n" if i % 5 == 0 else "") + f"Answer {i}."}]}
            for i in range(8)]
    cfg = QTargetConfig(output_dir=str(tmp_path / "out"), use_cpu=True, disable_tqdm=True, report_to="none",
                        per_device_train_batch_size=4, max_steps=2, save_strategy="no", max_length=64, plot=False)
    result = train(cfg, model=tiny_model, tokenizer=smollm2_tokenizer, train_dataset=rows, save_final=False)
    assert result.global_step == 2 and result.data_report.examples == 8
    assert result.data_report.split_at_boundary == 2 and result.data_report.skipped_untokenizable == 0


# A template that refuses non-alternating roles (as Llama-2 / Mistral templates do) and one that drops
# earlier turns' <think> blocks (as reasoning-model templates do, so it is not prefix-stable on them).
ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
               "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
THINK_DROPPING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and not loop.last %}"
                  "{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _chat(i, *turns):
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": r, "content": c} for r, c in zip(roles, turns)]}


@pytest.mark.parametrize("template,bad_row,reason", [
    (ALTERNATING, {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                {"role": "assistant", "content": "c"}]}, "the chat template refused the conversation"),
    (THINK_DROPPING, _chat(0, "q", "<think>hmm</think>A", "q2", "B"), "the chat template is not prefix-stable"),
])
def test_an_untokenisable_row_is_skipped_and_counted_or_refused_when_strict(smollm2_tokenizer, template, bad_row, reason):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = template
    rows = [_chat(i, f"q{i}", f"a{i}") for i in range(6)]
    rows.insert(3, bad_row)
    examples, report = tokenize_rows(tok, rows, TokenizeOptions())
    assert report.rows == 7 and report.examples == 6 and report.skipped_untokenizable == 1
    assert report.first_skipped.startswith(f"row 3: {reason}")
    assert "1 skipped as untokenisable (first: row 3" in report.summary()
    with pytest.raises(ValueError, match=f"row 3: {reason}.*strict_rows"):
        tokenize_rows(tok, rows, TokenizeOptions(strict_rows=True))


@pytest.mark.parametrize("row,match", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "a"}]},
     r"row 0, messages\[0\], content part 0: only text parts .* got 'image_url'"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}]},
     r"row 0, messages\[1\]: an assistant turn with 'tool_calls' cannot be trained on"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
     r"row 0, messages\[0\]: 'content' must be a string, null or a list of text parts, got int"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
     r"row 0, conversations\[1\]: unknown ShareGPT speaker 'robot'"),
    ({"conversations": [{"from": "human", "value": "q"}]}, r"row 0: 'conversations' has no assistant turn"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": "a"},
     r"row 0: 'prompt' and 'completion' must both be strings or both be lists"),
    ({"instruction": "i", "input": 5, "output": "o"}, r"row 0: column 'input' must be str, got int"),
    ({"messages": [{"content": "q"}]}, r"row 0, messages\[0\]: a turn needs 'role' and 'content'"),
])
def test_malformed_rows_name_the_row_turn_and_part(smollm2_tokenizer, row, match):
    with pytest.raises(ValueError, match=match):
        tokenize_rows(smollm2_tokenizer, [row], TokenizeOptions())


def test_partial_format_columns_are_named():
    with pytest.raises(ValueError, match="'completion' column but no 'prompt' column"):
        detect_format(["completion"])
    with pytest.raises(ValueError, match="not both 'instruction' and 'output'"):
        detect_format(["instruction", "input"])
    with pytest.raises(ValueError, match="'conversations' \\(ShareGPT\\).*'instruction' \\+ 'output' \\(Alpaca\\)"):
        detect_format(["question", "answer"])


def _metaspace_tokenizer():
    """A sentencepiece-style BPE (Metaspace, a "▁" prepended to every tokenised text, as legacy Llama /
    Mistral tokenizers do) trained so that "assistant:ok" is one token, with a template that puts the
    reply right after "assistant:". Tokenised apart, the reply would gain a "▁" the text does not have."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    corpus = ["user: hello there", "assistant:ok fine", "assistant:ok", "user: what now", "assistant: sure thing"] * 50
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"],
                                                       show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ':' + m['content'] }}{% if m['role'] == 'assistant' %}"
                         "{{ '</s>' }}{% endif %}{{ ' ' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}"
                         "{% endif %}")
    return tok


def test_a_merge_that_cannot_be_split_skips_the_row_on_a_sentencepiece_style_tokenizer():
    tok = _metaspace_tokenizer()
    assert "▁assistant:ok" in tok.tokenize("user:hello assistant:ok</s> ")  # the merge across the boundary
    rows = [_chat(0, "hello", " sure thing"), _chat(1, "hello", "ok")]
    examples, report = tokenize_rows(tok, rows, TokenizeOptions())
    assert report.examples == 1 and report.skipped_untokenizable == 1
    assert report.first_skipped.startswith("row 1: a token merges across the prompt/response boundary")
    supervised = [t for t, lab in zip(examples[0]["input_ids"], examples[0]["labels"]) if lab != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(supervised) == ["▁sure", "▁thing", "</s>", "▁"]  # " sure thing" + "</s>" + " "
    with pytest.raises(ValueError, match="row 1: a token merges.*strict_rows"):
        tokenize_rows(tok, rows, TokenizeOptions(strict_rows=True))


def test_untokenisable_eval_rows_are_reported_too(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = ALTERNATING
    refused = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                            {"role": "assistant", "content": "c"}]}
    data = prepare_data([_chat(i, f"q{i}", f"a{i}") for i in range(3)], tok,
                        eval_source=[_chat(9, "q", "a"), refused])
    assert len(data.eval) == 1 and data.report.skipped_untokenizable == 0
    assert any(n.startswith("eval data: 2 rows") and "1 skipped as untokenisable (first: row 1" in n
               for n in data.report.notes), data.report.notes
