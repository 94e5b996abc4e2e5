"""Bad input through the real CLI (`qtarget.cli.main`, in process): exit status 2, exactly one line on
stderr (`qtarget <cmd>: error: ...`) naming the problem, no traceback, and no output folder that looks
like a run (no config.yaml, checkpoint, metrics, curves or final model).

stderr is captured at the file-descriptor level (capfd), so library warnings, logging and progress bars
printed before the error would count as extra lines."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import datasets
import pytest

from qtarget.cli import main as qtarget_main
from qtarget.data import prepare_data
from qtarget.models import tiny_causal_lm
from qtarget.teacher_cache import build_cache
from test_train_support import tiny, tokenizer, toy_rows

# refuses conversations whose roles do not alternate (as the Llama-2 / Mistral templates do)
ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
               "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.csv", "curves.png", "final")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in zip(["user", "assistant"] * len(turns), turns)]}


@pytest.fixture(scope="module")
def files(tmp_path_factory, smollm2_tokenizer):
    """Tiny model folders, data files and a teacher cache with a deleted shard, shared by every case."""
    d = tmp_path_factory.mktemp("cli_errors")
    tok = tokenizer()
    model = tiny()
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    model.save_pretrained(d / "model_notok")
    tok.save_pretrained(d / "tokenizer_only")  # a folder with a tokenizer and no config.json
    chat_tok = copy.deepcopy(smollm2_tokenizer)
    chat_tok.chat_template = ALTERNATING
    tiny_causal_lm(chat_tok, hidden_size=16, num_layers=1, num_heads=2, seed=0).save_pretrained(d / "chat_model")
    chat_tok.save_pretrained(d / "chat_model")

    f = {"d": str(d)}
    f["train"] = _jsonl(d / "train.jsonl", toy_rows(8))
    f["empty"] = str(d / "empty.jsonl")
    (d / "empty.jsonl").write_text("")
    (d / "broken.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    f["broken"] = str(d / "broken.jsonl")
    (d / "data.txt").write_text("hello")
    f["txt"] = str(d / "data.txt")
    f["qa"] = _jsonl(d / "qa.jsonl", [{"question": "q", "answer": "a"}])
    f["no_response"] = _jsonl(d / "no_response.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    f["image"] = _jsonl(d / "image.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                     {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]},
        {"role": "assistant", "content": "a cat"}]}])
    f["tools"] = _jsonl(d / "tools.jsonl", [_chat("hi", "hello"), {"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "w"}}]}]}])
    f["speaker"] = _jsonl(d / "speaker.jsonl", [{"conversations": [{"from": "human", "value": "q"},
                                                                    {"from": "robot", "value": "a"}]}])
    f["chat"] = _jsonl(d / "chat.jsonl", [_chat(f"q{i}", f"a{i}") for i in range(4)])
    f["chat_refused"] = _jsonl(d / "chat_refused.jsonl", [_chat("q0", "a0"), _chat("q1", "a1"), {"messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}])
    f["weights"] = _jsonl(d / "weights.jsonl", [{"prompt": "p", "response": " a b", "token_weights": [1.0]}])
    weighted = [{**row, "token_weights": 1.0} for row in toy_rows(8)]
    f["weights_ok"] = _jsonl(d / "weights_ok.jsonl", weighted)
    f["weights_nan"] = _jsonl(d / "weights_nan.jsonl", weighted[:3] + [{**weighted[3], "token_weights": float("nan")}])
    f["weights_neg"] = _jsonl(d / "weights_neg.jsonl", weighted[:1] + [{**weighted[1], "token_weights": -0.5}])
    f["list_yaml"] = str(d / "list.yaml")
    (d / "list.yaml").write_text("- objective\n- dft\n")
    f["bad_yaml"] = str(d / "bad.yaml")
    (d / "bad.yaml").write_text("objective: dft\nobjective_args: {eta: 0.5\nmax_steps: 3\n")
    f["typo_yaml"] = str(d / "typo.yaml")
    (d / "typo.yaml").write_text("objectve: dft\n")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(toy_rows(4))}).save_to_disk(str(d / "saved"))

    data = prepare_data(toy_rows(8), tok, max_length=48)
    teacher = tiny_causal_lm(tok, hidden_size=16, num_layers=1, num_heads=2, seed=7)
    build_cache(teacher, tok, data.train, d / "cache", top_k=4, rows_per_shard=4, progress=False,
                settings={"max_length": 48})
    build_cache(teacher, tok, data.train, d / "full_cache", top_k=4, rows_per_shard=4, progress=False,
                settings={"max_length": 48})
    shards = sorted((d / "cache").rglob("*.safetensors"))
    assert len(shards) == 2
    shards[-1].unlink()

    (d / "dup.jsonl").write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n'
                                 '{"id": "b", "question": "2+2?", "answer": "4"}\n'
                                 '{"id": "a", "question": "3+3?", "answer": "6"}\n')
    (d / "noanswer.jsonl").write_text('{"question": "1+1?"}\n')
    return f


TRAIN = ["--output_dir", "{out}", "--use_cpu", "--disable_tqdm", "--max_steps", "1", "--max_length", "48"]
MODEL = ["--model", "{d}/model"]
DATA = ["--dataset", "{train}"]

# id: (argv, regex the one error line must match)
CASES = {
    # models
    "model folder missing": (["train", "--model", "/does/not/exist", *DATA, *TRAIN],
                             r"model \(--model\) '/does/not/exist' does not exist"),
    "model hub id offline": (["train", "--model", "someorg/some-model", *DATA, *TRAIN],
                             r"model \(--model\) 'someorg/some-model' is not a local folder.*HF_HUB_OFFLINE"),
    "model is a file": (["train", "--model", "{d}/model/config.json", *DATA, *TRAIN],
                        r"model \(--model\) '.*config.json' is a file"),
    "model folder without tokenizer": (["train", "--model", "{d}/model_notok", *DATA, *TRAIN],
                                       r"folder '.*model_notok' has no tokenizer files"),
    "teacher folder missing": (["train", *MODEL, *DATA, *TRAIN, "--objective", "target_sft",
                                "--teacher_model", "/no/teacher"],
                               r"teacher model \(--teacher_model\) '/no/teacher' does not exist"),
    "teacher hub id offline": (["train", *MODEL, *DATA, *TRAIN, "--objective", "kd", "--teacher_model", "org/t"],
                               r"teacher model \(--teacher_model\) 'org/t' is not a local folder.*HF_HUB_OFFLINE"),
    "reference folder missing": (["train", *MODEL, *DATA, *TRAIN, "--objective", "asft", "--ref_model", "./no_ref/"],
                                 r"reference model \(--ref_model\) './no_ref/' does not exist"),
    "teacher needed": (["train", *MODEL, *DATA, *TRAIN, "--objective", "target_sft"],
                       r"objective 'target_sft' needs a teacher model \(--teacher_model\)"),
    "dtype": (["train", *MODEL, *DATA, *TRAIN, "--dtype", "float8"], r"dtype must be one of .*got 'float8'"),
    # keys and config files
    "yaml syntax error": (["train", "--config", "{bad_yaml}", *MODEL, *DATA, *TRAIN],
                          r"--config '.*bad.yaml' is not valid YAML at line 3, column 1"),
    "config missing": (["train", "--config", "{d}/nope.yaml", *TRAIN], r"--config '.*nope.yaml' does not exist"),
    "config not a mapping": (["train", "--config", "{list_yaml}", *TRAIN], r"must hold a mapping of keys to values"),
    "config unknown key": (["train", "--config", "{typo_yaml}", *TRAIN], r"unknown key 'objectve'.*did you mean objective"),
    "flag unknown": (["train", *MODEL, *DATA, *TRAIN, "--lerning_rate", "1"], r"unknown key 'lerning_rate'.*--learning_rate"),
    "flag bad integer": (["train", *MODEL, *DATA, *TRAIN, "--max_steps", "many"], r"--max_steps: cannot read 'many'"),
    "flag bad boolean": (["train", *MODEL, *DATA, *TRAIN, "--packing", "maybe"], r"--packing: expected true or false"),
    "objective unknown": (["train", *MODEL, *DATA, *TRAIN, "--objective", "dtf"], r"unknown objective 'dtf'"),
    "eval_fraction": (["train", *MODEL, *DATA, *TRAIN, "--eval_fraction", "1.5"], r"eval_fraction must be in \[0, 1\)"),
    "resume without checkpoint": (["train", *MODEL, *DATA, *TRAIN, "--resume"],
                                  r"--resume: output_dir '.*out' has no checkpoint-N folder to resume from"),
    "resume folder missing": (["train", *MODEL, *DATA, *TRAIN, "--resume", "{d}/checkpoint-9"],
                              r"--resume: checkpoint folder '.*checkpoint-9' does not exist"),
    # data sources
    "dataset hub id offline": (["train", *MODEL, "--dataset", "someorg/some-data", *TRAIN],
                               r"dataset 'someorg/some-data' is not a local file.*HF_HUB_OFFLINE"),
    "dataset folder missing": (["train", *MODEL, "--dataset", "/no/data", *TRAIN], r"dataset '/no/data' does not exist"),
    "dataset file missing": (["train", *MODEL, "--dataset", "{d}/missing.jsonl", *TRAIN],
                             r"dataset file '.*missing.jsonl' does not exist"),
    "dataset file empty": (["train", *MODEL, "--dataset", "{empty}", *TRAIN], r"dataset file '.*empty.jsonl' is empty"),
    "dataset not json": (["train", *MODEL, "--dataset", "{broken}", *TRAIN],
                         r"dataset file '.*broken.jsonl' cannot be read as jsonl"),
    "dataset extension": (["train", *MODEL, "--dataset", "{txt}", *TRAIN], r"unsupported extension '.txt'"),
    "dataset split": (["train", *MODEL, "--dataset", "{d}/saved", "--dataset_split", "test", *TRAIN],
                      r"no split 'test'; available splits: train"),
    # rows
    "no supported format": (["train", *MODEL, "--dataset", "{qa}", *TRAIN],
                            r"columns \['answer', 'question'\] have none of the supported formats"),
    "missing value": (["train", *MODEL, "--dataset", "{no_response}", *TRAIN],
                      r"row 1: missing value in column 'response'"),
    "image content part": (["train", *MODEL, "--dataset", "{image}", *TRAIN],
                           r"row 0, messages\[0\], content part 1: only text parts .* got 'image_url'"),
    "assistant tool call": (["train", "--model", "{d}/chat_model", "--dataset", "{tools}", *TRAIN],
                            r"row 1, messages\[1\]: an assistant turn with 'tool_calls' cannot be trained on"),
    "sharegpt speaker": (["train", *MODEL, "--dataset", "{speaker}", *TRAIN],
                         r"row 0, conversations\[1\]: unknown ShareGPT speaker 'robot'"),
    "no chat template": (["train", *MODEL, "--dataset", "{chat}", *TRAIN], r"need a tokenizer with a chat template"),
    "strict rows": (["train", "--model", "{d}/chat_model", "--dataset", "{chat_refused}", "--strict_rows", *TRAIN],
                    r"row 2: the chat template refused the conversation \(Conversation roles must alternate.*strict_rows"),
    "nothing left": (["train", *MODEL, *DATA, *TRAIN[:-2], "--max_length", "3"],
                     r"the dataset is empty after tokenisation and filtering.*raise max_length"),
    "token weights": (["train", *MODEL, "--dataset", "{weights}", *TRAIN],
                      r"row 0: column 'token_weights' has 1 values but the row has 3 supervised tokens"),
    # teacher cache
    "teacher cache missing": (["train", *MODEL, *DATA, *TRAIN, "--objective", "target_sft", "--teacher_cache",
                               "{d}/no_cache"], r"no_cache is not a teacher cache: manifest.json is missing"),
    "teacher cache shard deleted": (["train", *MODEL, *DATA, *TRAIN, "--objective", "target_sft", "--teacher_cache",
                                     "{d}/cache"], r"teacher cache .* is incomplete: missing train rows 4-7"),
    "teacher cache for other data": (["train", *MODEL, *DATA, *TRAIN[:-2], "--max_length", "12", "--objective",
                                      "target_sft", "--teacher_cache", "{d}/full_cache"],
                                     r"teacher cache .* was built for other data.*max_length: cache has 48, this run 12"),
    "teacher-cache teacher missing": (["teacher-cache", *MODEL, "--teacher_model", "/no/teacher", *DATA,
                                       "--output_dir", "{out}"],
                                      r"teacher model \(--teacher_model\) '/no/teacher' does not exist"),
    "teacher-cache yaml syntax error": (["teacher-cache", "--config", "{bad_yaml}"],
                                        r"--config '.*bad.yaml' is not valid YAML at line 3, column 1"),
    # eval
    "eval duplicate ids in one file": (["eval", *MODEL, "--benchmarks", "{d}/dup.jsonl", "--output_dir", "{out}"],
                                       r"dup.jsonl:3: duplicate id 'a' in this file \(first on line 1\)"),
    "eval benchmark listed twice": (["eval", *MODEL, "--benchmarks", "arith:3,arith:3", "--output_dir", "{out}"],
                                    r"benchmark\(s\) 'arith:3' listed more than once"),
    "eval missing answer": (["eval", *MODEL, "--benchmarks", "{d}/noanswer.jsonl", "--output_dir", "{out}"],
                            r"noanswer.jsonl:1: field 'answer' is missing or empty"),
    "eval unknown benchmark": (["eval", *MODEL, "--benchmarks", "nosuch", "--output_dir", "{out}"],
                               r"unknown benchmark 'nosuch'"),
    "eval model missing": (["eval", "--model", "/no/model", "--benchmarks", "arith:3", "--output_dir", "{out}"],
                           r"model \(--model\) '/no/model' does not exist"),
    "eval tokenizer missing": (["eval", *MODEL, "--tokenizer", "/no/tok", "--benchmarks", "arith:3",
                                "--output_dir", "{out}"], r"tokenizer \(--tokenizer\) '/no/tok' does not exist"),
    "eval samples": (["eval", *MODEL, "--benchmarks", "arith:3", "--samples", "0", "--output_dir", "{out}"],
                     r"--samples must be >= 1, got 0"),
    "eval top_p": (["eval", *MODEL, "--benchmarks", "arith:3", "--top_p", "1.5", "--output_dir", "{out}"],
                   r"--top_p must be in \(0, 1\], got 1.5"),
    "eval model flag missing": (["eval", "--benchmarks", "arith:3"],
                                r"the following arguments are required: --model \(`qtarget eval --help`"),
    "eval not an integer": (["eval", *MODEL, "--samples", "abc"], r"argument --samples: invalid int value: 'abc'"),
    "train flag without value": (["train", *MODEL, *DATA, "--output_dir", "{out}", "--max_steps"],
                                 r"argument --max_steps: expected one argument"),
    "teacher-cache flag without value": (["teacher-cache", *MODEL, "--top_k"],
                                         r"argument --top_k: expected one argument"),
    # other commands
    "inspect unknown objective": (["inspect", "dtf"], r"unknown objective 'dtf' \(did you mean dft\?\)"),
    # ranges, named by flag (negative numbers written as -1e-3 included)
    "learning rate negative": (["train", *MODEL, *DATA, *TRAIN, "--learning_rate", "-1e-3"],
                               r"--learning_rate must be >= 0, got -0.001"),
    "learning rate nan": (["train", *MODEL, *DATA, *TRAIN, "--learning_rate", "nan"],
                          r"--learning_rate must be a finite number, got nan"),
    "batch size zero": (["train", *MODEL, *DATA, *TRAIN, "--per_device_train_batch_size", "0"],
                        r"--per_device_train_batch_size must be an integer >= 1|--per_device_train_batch_size must be >= 1, got 0"),
    "accumulation zero": (["train", *MODEL, *DATA, *TRAIN, "--gradient_accumulation_steps", "0"],
                          r"--gradient_accumulation_steps must be >= 1, got 0"),
    "max_steps zero": (["train", *MODEL, *DATA, *TRAIN[:-4], "--max_steps", "0", *TRAIN[-2:]],
                       r"--max_steps must be an integer >= 1 \(or -1: train num_train_epochs\), got 0"),
    "warmup negative": (["train", *MODEL, *DATA, *TRAIN, "--warmup_steps", "-2"], r"--warmup_steps must be >= 0, got -2"),
    "lora dropout one": (["train", *MODEL, *DATA, *TRAIN, "--use_lora", "--lora_dropout", "1"],
                         r"--lora_dropout must be in \[0, 1\), got 1.0"),
    "max_length one": (["train", *MODEL, *DATA, *TRAIN[:-2], "--max_length", "1"], r"--max_length must be >= 2, got 1"),
    "objective_args form": (["train", *MODEL, *DATA, *TRAIN, "--objective", "psft", "--objective_args", "eps"],
                            r"--objective_args: cannot read 'eps' in 'eps': expected key=value pairs"),
    "objective_args value": (["train", *MODEL, *DATA, *TRAIN, "--objective", "psft", "--objective_args", "eps=[0.2"],
                             r"--objective_args: cannot read the value of 'eps' \('\[0.2'\)"),
    "objective_args unknown parameter": (["train", *MODEL, *DATA, *TRAIN, "--objective", "psft", "--objective_args",
                                          "eta=0.2"], r"--objective_args 'eta=0.2' \(objective 'psft'\).*unknown parameter"),
    "lora target matches nothing": (["train", *MODEL, *DATA, *TRAIN, "--use_lora", "--lora_target_modules", "c_attn"],
                                    r"--lora_target_modules: 'c_attn' match\(es\) no module of LlamaForCausalLM .*its "
                                    r"module names are: .*q_proj"),
    "eval temperature negative": (["eval", *MODEL, "--benchmarks", "arith:2", "--temperature", "-1e-3",
                                   "--output_dir", "{out}"], r"--temperature must be >= 0, got -0.001"),
    "eval seed negative": (["eval", *MODEL, "--benchmarks", "arith:2", "--seed", "-1", "--output_dir", "{out}"],
                           r"--seed must be >= 0, got -1"),
    "profile limit negative": (["profile", *MODEL, *DATA, "--limit", "-1", "--output_dir", "{out}"],
                               r"--limit must be >= 0, got -1"),
    "profile memory budget negative": (["profile", *MODEL, *DATA, "--memory_budget_mb", "-1e-3", "--output_dir",
                                        "{out}"], r"--memory_budget_mb must be > 0, got -0.001"),
    "lab learning rate negative": (["lab", "--tiny", "--learning_rate", "-1e-3", "--output_dir", "{out}"],
                                   r"argument --learning_rate: must be > 0, got -0.001"),
    "lab curve points zero": (["lab", "--tiny", "--curve_points", "0", "--output_dir", "{out}"],
                              r"--curve_points must be >= 1, got 0"),
    "lab boolean flag": (["lab", "--tiny", "maybe", "--output_dir", "{out}"],
                         r"argument --tiny: expected true or false, got 'maybe'"),
    "teacher-cache top_k zero": (["teacher-cache", *MODEL, "--teacher_model", "{d}/model", *DATA, "--output_dir",
                                  "{out}", "--top_k", "0"], r"--top_k must be >= 1, got 0"),
    "teacher-cache max_length negative": (["teacher-cache", *MODEL, "--teacher_model", "{d}/model", *DATA,
                                           "--output_dir", "{out}", "--max_length", "-1e3"],
                                          r"--max_length must be >= 2, got -1000"),
    "teacher-cache temperature nan": (["teacher-cache", *MODEL, "--teacher_model", "{d}/model", *DATA,
                                       "--output_dir", "{out}", "--temperature", "nan"],
                                      r"--temperature must be a finite number, got nan"),
    "teacher-cache output folder is a file": (["teacher-cache", *MODEL, "--teacher_model", "{d}/model", *DATA,
                                               "--output_dir", "{out}/notes.txt"], r"--output_dir '.*notes.txt' is a file"),
    # per-token data
    "token weight nan": (["train", *MODEL, "--dataset", "{weights_nan}", *TRAIN, "--objective", "token_weighted"],
                         r"row 3: column 'token_weights': the value is nan; weights must be finite numbers >= 0"),
    "token weight negative": (["train", *MODEL, "--dataset", "{weights_neg}", *TRAIN, "--objective", "token_weighted"],
                              r"row 1: column 'token_weights': the value is -0.5"),
    # messages that say what to fix
    "model folder without config.json": (["train", "--model", "{d}/tokenizer_only", *DATA, *TRAIN],
                                         r"model \(--model\) folder '.*tokenizer_only' has no config.json \(it holds "
                                         r".*tokenizer.*\): point it at the folder where the model was saved"),
    "eval model folder without config.json": (["eval", "--model", "{d}/tokenizer_only", "--benchmarks", "arith:2",
                                               "--output_dir", "{out}"], r"has no config.json"),
    "output folder is a file": (["train", *MODEL, *DATA, *TRAIN, "--output_dir", "{out}/notes.txt"],
                                r"--output_dir '.*notes.txt' is a file, not a folder: choose a folder path"),
    "output folder under a file": (["train", *MODEL, *DATA, *TRAIN, "--output_dir", "{out}/notes.txt/run"],
                                   r"--output_dir '.*notes.txt/run' cannot be created: '.*notes.txt' is a file"),
    "eval output folder is a file": (["eval", *MODEL, "--benchmarks", "arith:2", "--output_dir", "{out}/notes.txt"],
                                     r"--output_dir '.*notes.txt' is a file"),
    "profile output folder is a file": (["profile", *MODEL, *DATA, "--output_dir", "{out}/notes.txt"],
                                        r"--output_dir '.*notes.txt' is a file"),
    "lab output folder is a file": (["lab", "--tiny", "--output_dir", "{out}/notes.txt"],
                                    r"--output_dir '.*notes.txt' is a file"),
}

# case -> (flag, fixed value): the same command with that flag's value fixed runs in the same folder
FIXES = {
    "learning rate negative": ("--learning_rate", "1e-3"),
    "learning rate nan": ("--learning_rate", "1e-3"),
    "batch size zero": ("--per_device_train_batch_size", "2"),
    "accumulation zero": ("--gradient_accumulation_steps", "2"),
    "max_steps zero": ("--max_steps", "1"),
    "warmup negative": ("--warmup_steps", "0"),
    "lora dropout one": ("--lora_dropout", "0.1"),
    "max_length one": ("--max_length", "48"),
    "objective_args form": ("--objective_args", "eps=0.2"),
    "objective_args value": ("--objective_args", "eps=0.2"),
    "objective_args unknown parameter": ("--objective_args", "eps=0.2"),
    "lora target matches nothing": ("--lora_target_modules", "q_proj,v_proj"),
    "eval temperature negative": ("--temperature", "0"),
    "eval seed negative": ("--seed", "1"),
    "profile limit negative": ("--limit", "4"),
    "profile memory budget negative": ("--memory_budget_mb", "64"),
    "teacher-cache top_k zero": ("--top_k", "4"),
    "teacher-cache max_length negative": ("--max_length", "48"),
    "teacher-cache temperature nan": ("--temperature", "1"),
    "teacher-cache output folder is a file": ("--output_dir", "{out}/cache"),
    "token weight nan": ("--dataset", "{weights_ok}"),
    "token weight negative": ("--dataset", "{weights_ok}"),
    "model folder without config.json": ("--model", "{d}/model"),
    "eval model folder without config.json": ("--model", "{d}/model"),
    "output folder is a file": ("--output_dir", "{out}/run"),
    "output folder under a file": ("--output_dir", "{out}/run"),
    "eval output folder is a file": ("--output_dir", "{out}/run"),
    "profile output folder is a file": ("--output_dir", "{out}/run"),
    "lab learning rate negative": ("--learning_rate", "1e-3"),
    "lab boolean flag": ("--tiny", "true"),
    "lab curve points zero": ("--curve_points", "1"),
    "lab output folder is a file": ("--output_dir", "{out}/lab"),
}
FAST = {"train": ["--save_strategy", "no", "--plot", "false"], "eval": ["--max_new_tokens", "4", "--no_progress"],
        "profile": ["--limit", "4", "--no_progress"], "teacher-cache": ["--progress", "false"],
        "lab": ["--objectives", "sft", "--tasks", "sum", "--no_progress"]}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (folders as empty entries)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"") for p in sorted(folder.rglob("*"))}


def _run(argv: list[str], capfd) -> tuple[int, str]:
    capfd.readouterr()
    rc = qtarget_main(argv)
    return rc, capfd.readouterr().err


def test_the_table_is_large():
    assert len(CASES) >= 35


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_no_run(case, files, tmp_path, capfd):
    argv, pattern = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("a file of the user's, which a refused run must leave alone\n")
    before = snapshot(out)
    values = {**files, "out": str(out)}
    argv = [a.format(**values) for a in argv]
    rc, err = _run(argv, capfd)
    assert snapshot(out) == before  # the folder is byte-identical: nothing written, nothing removed
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"qtarget {argv[0]}: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not [n for n in left if n in RUN_FILES or n.startswith("checkpoint-")], left


def test_a_teacher_folder_without_tokenizer_files_warns_and_trains(files, tmp_path, recwarn):
    """The documented warning (only the LM-head size is checked), not a tokenizer-conversion error."""
    d = files["d"]
    rc = qtarget_main(["train", "--model", f"{d}/model", "--dataset", files["train"], "--output_dir", str(tmp_path / "o"),
                       "--use_cpu", "--disable_tqdm", "--max_steps", "1", "--max_length", "48", "--save_strategy", "no",
                       "--objective", "target_sft", "--teacher_model", f"{d}/model_notok", "--plot", "false"])
    assert rc == 0
    messages = [str(w.message) for w in recwarn.list]
    assert any("cannot load the teacher" in m and "its folder has no tokenizer files" in m
               and "only its LM-head size is checked" in m for m in messages), messages
    assert (tmp_path / "o" / "config.yaml").exists()


def test_every_fix_names_a_case():
    assert set(FIXES) <= set(CASES)


@pytest.mark.parametrize("case", list(FIXES))
def test_the_refused_command_with_the_value_fixed_runs_in_the_same_folder(case, files, tmp_path, capfd):
    """The refusal left nothing behind that would refuse the corrected rerun."""
    argv, _ = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept\n")
    values = {**files, "out": str(out)}
    refused = [a.format(**values) for a in argv]
    flag, value = FIXES[case]
    at = max(i for i, a in enumerate(argv) if a == flag) + 1  # the last occurrence is the one argparse keeps
    fixed = [(value if i == at else a).format(**values) for i, a in enumerate(argv)] + FAST.get(argv[0], [])
    rc, err = _run(refused, capfd)
    assert rc == 2, err
    rc, err = _run(fixed, capfd)
    assert rc == 0, err
    assert "Traceback" not in err
    assert (out / "notes.txt").read_text() == "kept\n"
