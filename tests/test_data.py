"""qtarget.data: formats, response-only masking, truncation report, token weights, packing, sources."""
from __future__ import annotations

import json

import datasets
import pytest
import torch

from qtarget.data import Collator, load_rows, pack_examples, prepare_data, split_examples, write_jsonl
from qtarget.data.tokenize import IGNORE_INDEX, TokenizeOptions, tokenize_row, tokenize_rows
from test_data_formats import supervised_runs
from test_train_support import tiny, tokenizer, toy_rows


def supervised(ex) -> list[int]:
    return [t for t in ex["labels"] if t != IGNORE_INDEX]


def test_prompt_response_masks_the_prompt_and_appends_eos():
    tok = tokenizer("gpt2")
    ex = tokenize_row(tok, {"prompt": "Question: 2+2?", "response": " Answer: 4"}, "prompt_response", TokenizeOptions())
    p = tok("Question: 2+2?")["input_ids"]
    r = tok(" Answer: 4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"] == p + r
    assert ex["labels"] == [IGNORE_INDEX] * len(p) + r
    full = tokenize_row(tok, {"prompt": "Question: 2+2?", "response": " Answer: 4"}, "prompt_response",
                        TokenizeOptions(response_only=False))
    assert full["labels"] == full["input_ids"]


def test_messages_supervise_exactly_the_assistant_turns():
    tok = tokenizer("smollm2")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there!"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is 4."}]
    ex = tokenize_row(tok, {"messages": msgs}, "messages", TokenizeOptions(max_length=None))
    assert ex["input_ids"] == tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    # the supervised spans, decoded per contiguous run, are the two assistant replies with their end marker
    assert supervised_runs(tok, ex) == ["Hello there!<|im_end|>\n", "It is 4.<|im_end|>\n"]


def test_text_rows_supervise_everything():
    tok = tokenizer("gpt2")
    ex = tokenize_row(tok, {"text": "plain text here"}, "text", TokenizeOptions())
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] == tok.eos_token_id


def test_non_prefix_stable_template_is_an_error():
    tok = tokenizer("smollm2")
    tok = type(tok).from_pretrained(tok.name_or_path) if tok.name_or_path else tok
    tok.chat_template = ("{% for m in messages|reverse %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(ValueError, match="row 7: the chat template is not prefix-stable"):
        tokenize_row(tok, {"messages": msgs}, "messages", TokenizeOptions(), index=7)


def test_truncation_is_counted_and_rows_without_supervision_are_dropped():
    tok = tokenizer("gpt2")
    rows = [{"prompt": "short", "response": " yes"},
            {"prompt": "a prompt", "response": " word" * 40},          # truncated, keeps some response
            {"prompt": "word " * 40, "response": " lost"}]            # prompt fills max_length: dropped
    examples, report = tokenize_rows(tok, rows, TokenizeOptions(max_length=16))
    assert report.rows == 3 and report.examples == 2
    assert report.truncated == 1 and report.dropped_no_supervised == 1
    assert all(len(ex["input_ids"]) <= 16 for ex in examples)
    assert report.supervised_tokens == sum(len(supervised(ex)) for ex in examples)


def test_empty_after_filtering_is_an_error():
    tok = tokenizer("gpt2")
    with pytest.raises(ValueError, match="empty after tokenisation and filtering"):
        tokenize_rows(tok, [{"prompt": "word " * 40, "response": " x"}], TokenizeOptions(max_length=8))


def test_missing_column_names_the_column_and_row(tmp_path):
    tok = tokenizer("gpt2")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"row 1: missing value in column 'response'"):
        prepare_data(str(path), tok)
    with pytest.raises(ValueError, match=r"no 'response' or 'completion' column"):
        prepare_data([{"prompt": "a"}], tok)
    with pytest.raises(ValueError, match=r"none of the supported formats"):
        prepare_data([{"question": "a", "answer": "b"}], tok)


def test_token_weights_scalar_list_and_bad_length():
    tok = tokenizer("gpt2")
    opts = TokenizeOptions()
    ex = tokenize_row(tok, {"prompt": "p", "response": " a b", "token_weights": 0.5}, "prompt_response", opts)
    assert [w for w, lab in zip(ex["token_weights"], ex["labels"]) if lab != IGNORE_INDEX] == [0.5] * len(supervised(ex))
    assert all(w == 0.0 for w, lab in zip(ex["token_weights"], ex["labels"]) if lab == IGNORE_INDEX)
    n = len(supervised(ex))
    ws = [float(i) for i in range(n)]
    ex2 = tokenize_row(tok, {"prompt": "p", "response": " a b", "token_weights": ws}, "prompt_response", opts)
    assert [w for w, lab in zip(ex2["token_weights"], ex2["labels"]) if lab != IGNORE_INDEX] == ws
    with pytest.raises(ValueError, match=rf"row 3: column 'token_weights' has 1 values but the row has {n}"):
        tokenize_row(tok, {"prompt": "p", "response": " a b", "token_weights": [1.0]}, "prompt_response", opts, 3)
    batch = Collator(tok.pad_token_id)([ex, ex2])
    assert batch["token_weights"].shape == batch["labels"].shape


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "disk"])
def test_every_source_format_gives_the_same_rows(tmp_path, fmt):
    rows = toy_rows(5)
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        write_jsonl(rows, path)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "csv":
        ds.to_csv(str(path), index=False)
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    loaded = load_rows(str(path))
    assert [dict(r) for r in loaded] == rows


def test_unknown_extension_and_missing_split(tmp_path):
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported extension '.txt'"):
        load_rows(str(tmp_path / "data.txt"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(toy_rows(2))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="no split 'test'"):
        load_rows(str(tmp_path / "dd"), split="test")


def test_eval_split_is_disjoint_and_deterministic():
    items = list(range(20))
    tr, ev = split_examples(items, 0.25, seed=3)
    assert len(ev) == 5 and sorted(tr + ev) == items and not set(tr) & set(ev)
    assert split_examples(items, 0.25, seed=3) == (tr, ev)
    with pytest.raises(ValueError, match="eval_fraction"):
        split_examples(items, 1.0, seed=0)


def test_packing_matches_unpacked_log_probs():
    """A packed row gives every example exactly the log-probs it gets alone (no cross-example attention)."""
    tok = tokenizer("gpt2")
    data = prepare_data(toy_rows(5), tok, max_length=None)
    examples = data.train.examples
    packed = pack_examples(examples, max_length=1000)
    assert len(packed) == 1
    assert packed[0]["position_ids"][:len(examples[0]["input_ids"])] == list(range(len(examples[0]["input_ids"])))
    model = tiny()
    collate = Collator(tok.pad_token_id)
    with torch.no_grad():
        pb = collate(packed)
        assert "attention_mask" not in pb
        packed_logp = torch.log_softmax(model(input_ids=pb["input_ids"], position_ids=pb["position_ids"],
                                                  use_cache=False).logits, -1)  # as the trainer calls it
        offset = 0
        for ex in examples:
            n = len(ex["input_ids"])
            alone = torch.log_softmax(model(input_ids=torch.tensor([ex["input_ids"]])).logits, -1)
            assert torch.allclose(packed_logp[0, offset:offset + n], alone[0], atol=1e-5)
            offset += n
    # the first token of each example is never a target
    starts = [i for i, p in enumerate(packed[0]["position_ids"]) if p == 0]
    assert all(packed[0]["labels"][i] == IGNORE_INDEX for i in starts)


def test_packing_respects_max_length():
    tok = tokenizer("gpt2")
    examples = prepare_data(toy_rows(12), tok, max_length=32).train.examples
    rows = pack_examples(examples, max_length=40)
    assert all(len(r["input_ids"]) <= 40 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)
