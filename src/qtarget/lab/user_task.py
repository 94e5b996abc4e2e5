"""The lab on the user's own data: a `LabTask` built from a dataset of demonstrations.

    pairs, instruction = load_pairs("train.jsonl")               # any chat / prompt-response format of `qtarget train`
    split = plan_split(pairs, settings, own_teacher=True)         # disjoint held-out, generation, teacher, training rows
    task = user_task(settings, pairs, instruction, split, name="train.jsonl")

Rows become (prompt, response) pairs through the data path of `qtarget train` (`qtarget.data.formats`, with
the same chat-template default, `qtarget.data.reading`: chat and Alpaca rows go through the tokenizer's
template, plain-string prompt/completion rows do not, and the lab then scores, trains and prompts them as
`prompt + response + eos` exactly as `qtarget train` does; a multi-turn chat contributes its last
user/assistant exchange). The rows are shuffled once (settings.seed) and cut into disjoint parts:

- held-out (`ranking`): each demonstration against `rank_distractors` distractors; the correct one gives the
  held-out NLL and entropy. A distractor is the demonstration with every occurrence of its numeric answer
  replaced by a near miss (the last digit off by 2, else 1, 3, ...: the text stays consistent, only the
  computation is wrong, as in the built-in tasks) when the answer is written in the response, else another
  held-out row's response;
- generation: held-out rows with a checkable answer — an `answer` column (`--answer_column`), or a final
  answer the response states in the form `qtarget eval` reads (\\boxed{}, '#### X', 'The answer is X'),
  prompted with exactly the tokens training puts before the reply. The answer form is learned from the
  demonstrations (`answer_form_of`): the form at least half of them state their answer in. A response is a
  format failure when it states no answer in that form, and is graded by the answer it states there; when
  the demonstrations state no answer in a recognisable form, format failures are not measured (the report
  says why) and accuracy takes `extract_answer`'s reading, down to the last number of the response;
- teacher: rows for the target_sft teacher the lab trains itself (SFT of the base model), only when no
  teacher is given;
- training pool: the rest; seed s trains on `train_examples` rows drawn from it with seed s.

With `noise` > 0 the lab plants noise in a training draw: a `noise` share of the rows that have a numeric
answer inside their response get that answer replaced by a wrong number (kind "corrupt"), which noise fit
then measures against the same tokens of clean rows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from transformers import AutoConfig

from qtarget.data import load_rows
from qtarget.data.formats import Conversation, detect_format, normalize_row
from qtarget.data.reading import describe_reading, prompt_prefix, templates_pairs
from qtarget.evaluation import Problem
from qtarget.evaluation.answers import ANSWER_FORMS, FORM_TEXT, answer_form, extract_answer, normalize_answer, stated_answer
from qtarget.lab.metrics import chat_sequence
from qtarget.lab.ood_text import ood_texts
from qtarget.lab.settings import PRESETS, LabSettings, settings_for
from qtarget.lab.task import LabTask
from qtarget.lab.tasks import NEAR_SLIPS, near_deltas
from qtarget.lab.teacher import TEACHER_DATA_SEED
from qtarget.models.load import load_aux_model, load_tokenizer, model_position_limit, resolve

USER_EVAL_SEED = 9_100_000  # stream of the user task's held-out choices (apart from the built-in task's)
NUMBER = r"-?\d+(?:\.\d+)?"


@dataclass(frozen=True)
class Pair:
    index: int  # row index in the dataset
    prompt: str
    response: str
    answer: str | None  # normalised, None when the row carries no checkable answer
    templated: bool = True  # read through the chat template (False: prompt + response + eos)


def _last_exchange(conv: Conversation, index: int) -> tuple[str | None, str, str]:
    msgs = conv.messages
    last_a = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    users = [i for i in range(last_a) if msgs[i]["role"] == "user"]
    if not users:
        raise ValueError(f"row {index}: no user turn before the last assistant turn: the lab needs a prompt to answer")
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    return system, msgs[users[-1]]["content"], msgs[last_a]["content"]


def _answer_of(row: dict, response: str, column: str | None) -> str | None:
    if column and row.get(column) is not None and str(row[column]).strip():
        return normalize_answer(str(row[column]))
    form = answer_form(response)
    return None if form is None else normalize_answer(stated_answer(response, form))


def answer_form_of(pairs: Sequence[Pair]) -> tuple[str | None, str]:
    """(the form the demonstrations state their final answer in, or None; one sentence for the report).
    The form is the most common one (ANSWER_FORMS) when at least half of the demonstrations use it."""
    counts = {f: 0 for f in ANSWER_FORMS}
    for p in pairs:
        form = answer_form(p.response)
        if form is not None:
            counts[form] += 1
    top = max(ANSWER_FORMS, key=lambda f: counts[f])  # ties: the order extract_answer reads them
    n = len(pairs)
    if counts[top] > 0 and 2 * counts[top] >= n:
        return top, (f"format failure = a response that states no final answer as {FORM_TEXT[top]}, the form "
                     f"{counts[top]} of {n} demonstrations use")
    stated = sum(counts.values())
    return None, (f"format failures not measured: {stated} of {n} demonstrations state their final answer in a "
                  f"recognisable form ({', '.join(FORM_TEXT.values())}), and no form is used by half of them; "
                  f"accuracy reads a response's answer as `qtarget eval` does, down to its last number")


def load_pairs(source: Any, *, split: str = "train", name: str | None = None,
               answer_column: str | None = "answer", tokenizer: Any = None,
               chat_template: bool | None = None) -> tuple[list[Pair], str | None]:
    """(pairs, shared instruction). The instruction is the rows' system turn when every row has the same
    one (the lab then uses it as the task's system turn); otherwise each row's system turn, if any, is put
    before its prompt. `chat_template` (None: per format) and `tokenizer` decide, as for `qtarget train`,
    which pairs are read through the chat template (`Pair.templated`)."""
    rows = load_rows(source, split=split, name=name)
    if len(rows) == 0:
        raise ValueError(f"dataset {source!r} has no rows")
    fmt = detect_format(rows.column_names)
    if fmt == "text":
        raise ValueError(f"dataset {source!r} has plain `text` rows: the lab needs demonstrations with a prompt "
                         f"(chat messages, prompt/response, prompt/completion or alpaca rows)")
    templated = templates_pairs(fmt, chat_template, tokenizer)
    raw = []
    for i, row in enumerate(rows):
        item = normalize_row(row, fmt, i, chat_template=templated)
        if isinstance(item, Conversation):
            system, prompt, response = _last_exchange(item, i)
        else:  # a plain prompt/response pair: no system turn
            system, prompt, response = None, item.prompt, item.response
        raw.append((i, row, system, prompt, response, isinstance(item, Conversation)))
    if len({r[5] for r in raw}) > 1:
        raise ValueError(f"dataset {source!r} mixes rows read through the chat template with plain ones (prompt/"
                         f"completion as message lists and as strings): the lab needs one reading for every row")
    systems = {r[2] for r in raw}
    shared = systems.pop() if len(systems) == 1 else None
    pairs = []
    for i, row, system, prompt, response, conv in raw:
        if system is not None and shared is None:
            prompt = f"{system}\n\n{prompt}"
        pairs.append(Pair(i, prompt, response, _answer_of(row, response, answer_column), templated=conv))
    return pairs, shared


def corrupt(response: str, answer: str | None, rng: random.Random, avoid: Sequence[str] = ()) -> str | None:
    """The response with its last occurrence of the (numeric) answer replaced by a wrong number; None when
    the answer is not a number written in the response."""
    if answer is None or not re.fullmatch(NUMBER, answer):
        return None
    matches = list(re.finditer(answer_pattern(answer), response))
    if not matches:
        return None
    value = float(answer)
    for _ in range(20):
        delta = rng.choice([-1, 1]) * rng.randint(1, 9)
        wrong = value + delta if value + delta >= 0 or value < 0 else value + abs(delta)
        text = str(int(wrong)) if wrong == int(wrong) and "." not in answer else f"{wrong:g}"
        if text != answer and text not in avoid:
            m = matches[-1]
            return response[:m.start()] + text + response[m.end():]
    return None


# a near miss of a numeric answer, in order of preference: its last digit off by two, one, three (the slips the
# built-in sum task's distractors use), then by four to nine
NEAR_MISS_TIERS = NEAR_SLIPS + (tuple(d for k in range(4, 10) for d in (-k, k)),)


def answer_pattern(answer: str) -> str:
    """A regex for `answer` written as a whole number in a text (not part of a longer number)."""
    return rf"(?<![\d.])(?<!\d,){re.escape(answer)}(?!\d|[.,]\d)"


def near_miss(response: str, answer: str | None, rng: random.Random, taken: Sequence[str] = ()
              ) -> tuple[str, str] | None:
    """(the response with every occurrence of its numeric answer replaced by one near miss (its last digit
    off by 2, else 1, 3, ...; the sign order drawn from `rng`), that number), so the text stays consistent — the result
    line and the stated answer agree — and only the computation is wrong, as in the built-in tasks'
    distractors. None when the answer is not a number written in the response, or every near miss is in
    `taken` (numbers already used) or would turn a non-negative answer negative."""
    if answer is None or not re.fullmatch(NUMBER, answer):
        return None
    pattern = answer_pattern(answer)
    if not re.search(pattern, response):
        return None
    decimals = len(answer.split(".")[1]) if "." in answer else 0
    unit = 10 ** -decimals
    for delta in near_deltas(rng, NEAR_MISS_TIERS):
        wrong = float(answer) + delta * unit
        if wrong < 0 <= float(answer):
            continue
        text = f"{wrong:.{decimals}f}"
        if text != answer and text not in taken:
            return re.sub(pattern, text, response), text
    return None


@dataclass
class Split:
    """Row indices (into the pairs list) of each disjoint part, and what was dropped or capped."""

    ranking: list[int]
    generation: list[int]
    teacher: list[int]
    pool: list[int]
    notes: list[str]


def plan_split(pairs: Sequence[Pair], settings: LabSettings, *, own_teacher: bool) -> Split:
    """Disjoint parts sized from the settings, capped so that each is at most a fifth of the rows
    (the teacher part a quarter) and the training pool keeps the rest."""
    n = len(pairs)
    order = list(range(n))
    random.Random(f"user-split:{settings.seed}").shuffle(order)
    notes: list[str] = []
    need = settings.rank_distractors + 1
    n_rank = min(settings.rank_items, max(need, n // 5))
    ranking, rest = order[:n_rank], order[n_rank:]
    answered = [i for i in rest if pairs[i].answer is not None]
    n_gen = min(settings.eval_in_domain, max(1, n // 5)) if answered else 0
    generation = answered[:n_gen]
    rest = [i for i in rest if i not in set(generation)]
    teacher: list[int] = []
    if own_teacher:
        n_teacher = min(settings.teacher_examples, max(1, n // 4))
        teacher, rest = rest[:n_teacher], rest[n_teacher:]
    if len(rest) < settings.batch_size:
        raise ValueError(f"the dataset has {n} usable rows: after {len(ranking)} held-out, {len(generation)} generation"
                         f"{f' and {len(teacher)} teacher' if own_teacher else ''} rows, {len(rest)} remain for "
                         f"training, fewer than one batch ({settings.batch_size}); give more rows")
    if not generation:
        raise ValueError("no row carries a checkable answer (an answer column — see --answer_column — or a response "
                         "stating its final answer as \\boxed{}, '#### X' or 'The answer is X'): the lab needs one "
                         "for generation accuracy")
    return Split(ranking, generation, teacher, rest, notes)


def _ranking_item(pairs: Sequence[Pair], idx: Sequence[int], k: int, n_distractors: int,
                  rng: random.Random) -> dict[str, Any]:
    p = pairs[idx[k]]
    candidates, taken, kinds = [p.response], [p.answer or ""], []
    while len(candidates) < 1 + n_distractors:
        miss = near_miss(p.response, p.answer, rng, taken)
        if miss is None:
            break
        candidates.append(miss[0])
        taken.append(miss[1])
        kinds.append("near miss")
    step = 1
    while len(candidates) < 1 + n_distractors:  # other held-out rows' responses
        other = pairs[idx[(k + step) % len(idx)]].response
        step += 1
        if other not in candidates:
            candidates.append(other)
            kinds.append("other row")
        if step > len(idx):
            raise ValueError("the held-out rows have too few distinct responses for the ranking distractors")
    return {"id": f"row{p.index}", "prompt": p.prompt, "candidates": candidates, "kinds": kinds}


def _version(pairs: Sequence[Pair], split: Split) -> str:
    body = json.dumps([[p.prompt, p.response, p.answer, p.templated] for p in pairs] + [split.teacher], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def generation_prompt(tokenizer, pair: Pair, instruction: str | None, max_length: int) -> list[int]:
    """The tokens training puts before `pair`'s reply: what the model is prompted with to answer it."""
    return prompt_prefix(chat_sequence(tokenizer, pair.prompt, pair.response, max_length,
                                       instruction=instruction if pair.templated else None, template=pair.templated))


def user_task(settings: LabSettings, pairs: Sequence[Pair], instruction: str | None, split: Split, *,
              name: str, tokenizer: Any = None) -> LabTask:
    """The LabTask of the user's rows (see the module docstring). With `tokenizer`, each generation problem
    carries its prompt tokens (`meta["prompt_ids"]`: the tokens training puts before the reply); without
    one, generation renders the prompt through the chat template (chat rows only)."""
    templated = {p.templated for p in pairs}
    if len(templated) != 1:
        raise ValueError("the pairs mix rows read through the chat template with plain ones")
    chat = templated.pop()
    if not chat and tokenizer is None:
        raise ValueError("a task of plain prompt/completion rows needs the tokenizer for its generation prompts")
    eval_rng = random.Random(f"user-ranking:{settings.seed}")
    ranking = tuple(_ranking_item(pairs, split.ranking, k, settings.rank_distractors, eval_rng)
                    for k in range(len(split.ranking)))
    generation = tuple(Problem(id=f"row{pairs[i].index}", question=pairs[i].prompt, answer=pairs[i].answer,
                               source=name, meta={} if tokenizer is None else {"prompt_ids": generation_prompt(
                                   tokenizer, pairs[i], instruction, settings.max_length)})
                       for i in split.generation)
    form, format_note = answer_form_of(pairs)

    def parse_answer(response: str) -> str | None:
        found = extract_answer(response) if form is None else stated_answer(response, form)
        return None if found is None else normalize_answer(found)

    def demonstrations(seed: int, n: int, noise: float) -> list[dict[str, Any]]:
        if seed == TEACHER_DATA_SEED:  # the target_sft teacher's own part: clean, never a student's row
            if not split.teacher:
                raise ValueError("the user task has no teacher rows (a teacher was given)")
            return [{"prompt": pairs[i].prompt, "response": pairs[i].response, "noise": "clean"}
                    for i in split.teacher[:n]]
        rng = random.Random(f"user-train:{seed}")
        chosen = rng.sample(split.pool, min(n, len(split.pool)))
        wrong = {i: corrupt(pairs[i].response, pairs[i].answer, random.Random(f"user-noise:{seed}:{i}"))
                 for i in chosen}
        corruptible = [i for i in chosen if wrong[i] is not None]
        noisy = set(rng.sample(corruptible, min(len(corruptible), int(round(noise * len(chosen))))))
        rows = []
        for i in chosen:
            p = pairs[i]
            if i in noisy:
                rows.append({"prompt": p.prompt, "response": wrong[i], "noise": "corrupt", "clean_response": p.response})
                continue
            row = {"prompt": p.prompt, "response": p.response, "noise": "clean"}
            if noise > 0 and wrong[i] is not None:
                row["counterfactual_response"] = wrong[i]
            rows.append(row)
        return rows

    first = pairs[split.pool[0]]
    n_corruptible = sum(corrupt(pairs[i].response, pairs[i].answer, random.Random(0)) is not None for i in split.pool)
    return LabTask(
        name=f"user:{name}", version=_version(pairs, split),
        description=(f"your demonstrations ({name}: {len(pairs)} rows; {len(split.ranking)} held out for NLL, "
                     f"entropy and answer ranking, {len(split.generation)} for generation, "
                     f"{len(split.teacher)} for the target_sft teacher, {len(split.pool)} in the training pool; "
                     f"read {'through the chat template' if chat else 'without a chat template: prompt + response + eos'}"
                     f"; {format_note})"),
        noise_description=(f"planted by the lab: the numeric final answer inside a response replaced by a wrong "
                           f"number ({n_corruptible} of {len(split.pool)} training-pool rows can be corrupted)"),
        instruction=instruction,
        demonstrations=demonstrations,
        generation=generation,
        parse_answer=parse_answer,
        ranking=ranking,
        ood=tuple(ood_texts(settings.ood_texts, USER_EVAL_SEED + settings.seed)),
        example={"prompt": first.prompt, "response": first.response},
        chat_template=chat, answer_form=form, format_note=format_note,
    )


# ------------------------------------------------------------------------------ the CLI's setup
USER_DEFAULTS = {"noise": 0.0, "max_length": 512}  # never corrupt the user's data unless asked


def scaled_defaults(model: str) -> dict[str, Any]:
    """Training defaults scaled to the model's size (from its config, nothing loaded): the top fifth of
    the layers (the built-in lab trains 6 of SmolLM2's 30), a smaller batch and learning rate for larger
    models (2510.00526 and DFT trained 1.5B-8B models at 5e-5 / 2e-5)."""
    cfg = AutoConfig.from_pretrained(resolve(model))
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers, hidden, vocab = int(cfg.num_hidden_layers), int(cfg.hidden_size), int(cfg.vocab_size)
    params = 12 * layers * hidden * hidden + vocab * hidden  # decoder blocks + embeddings, roughly
    if params <= 3e8:
        batch, lr = 8, 2e-4
    elif params <= 2e9:
        batch, lr = 4, 5e-5
    else:
        batch, lr = 2, 2e-5
    return {"train_top_layers": max(1, round(layers / 5)), "batch_size": batch, "learning_rate": lr,
            "approx_params": params, "layers": layers}


def drop_long(pairs: Sequence[Pair], tokenizer, max_length: int, instruction: str | None) -> tuple[list[Pair], int]:
    """The pairs whose sequence fits `max_length` tokens, and how many did not."""
    kept = []
    for p in pairs:
        try:
            chat_sequence(tokenizer, p.prompt, p.response, max_length,
                          instruction=instruction if p.templated else None, template=p.templated)
        except ValueError:
            continue
        kept.append(p)
    if not kept:
        raise ValueError(f"no row fits --max_length {max_length} tokens; raise --max_length")
    return kept, len(pairs) - len(kept)


def fit_position_limit(settings: LabSettings, limit: int | None, notes: list[str]) -> LabSettings:
    """`settings` with max_length no longer than the model's position limit (noted), as `qtarget train` clamps
    it; unchanged when the limit is unknown or not exceeded."""
    if limit is None or settings.max_length <= limit:
        return settings
    notes.append(f"--max_length {settings.max_length} → {limit}: the model's position limit (its config's "
                 f"max_position_embeddings / n_positions)")
    return dataclasses.replace(settings, max_length=limit)


def setup_user_lab(*, model: str | None, dataset: str | None, preset: str, overrides: dict[str, Any],
                   teacher: str | None = None, answer_column: str | None = "answer", split: str = "train",
                   config: str | None = None, chat_template: bool | None = None
                   ) -> tuple[LabSettings, LabTask | None, tuple | None, list[str]]:
    """(settings, task or None for the built-in task, (teacher model, info) or None, notes) for
    `qtarget lab --model M [--dataset D] [--teacher T]`. Flags the user gave win over the scaled defaults."""
    given = {k: v for k, v in overrides.items() if v is not None}
    values: dict[str, Any] = {}
    notes: list[str] = []
    model_name = model or PRESETS[preset].get("model", "smollm2")
    if model_name not in ("smollm2", "tiny") and not Path(model_name).is_dir():
        raise ValueError(f"--model must be 'smollm2', 'tiny' or a model folder, got {model_name!r}")
    if model and model not in ("smollm2", "tiny") and preset != "tiny":  # --tiny keeps its toy sizes
        scaled = scaled_defaults(model)
        values.update({k: scaled[k] for k in ("train_top_layers", "batch_size", "learning_rate")})
        notes.append(f"{model}: ~{scaled['approx_params'] / 1e6:.0f}M parameters, {scaled['layers']} layers → "
                     f"defaults: top {values['train_top_layers']} layers trained, batch {values['batch_size']}, "
                     f"lr {values['learning_rate']:g}")
    limit = None if model_name == "tiny" else model_position_limit(model_name)
    if dataset is None:
        settings = fit_position_limit(settings_for(preset, **{**values, **given, "model": model_name}), limit, notes)
        return settings, None, _given_teacher(teacher, settings, model_name), notes
    values.update(USER_DEFAULTS)
    settings = fit_position_limit(settings_for(preset, **{**values, **given, "model": model_name}), limit, notes)
    tokenizer = load_tokenizer("smollm2" if model_name == "tiny" else model_name)
    pairs, instruction = load_pairs(dataset, split=split, name=config, answer_column=answer_column,
                                    tokenizer=tokenizer, chat_template=chat_template)
    fmt = detect_format(load_rows(dataset, split=split, name=config).column_names)
    notes.append(f"data: {len(pairs)} rows ({describe_reading(fmt, sum(p.templated for p in pairs), len(pairs))})")
    pairs, dropped = drop_long(pairs, tokenizer, settings.max_length, instruction)
    if dropped:
        notes.append(f"{dropped} rows longer than --max_length {settings.max_length} tokens left out")
    own_teacher = teacher is None and settings.needs_teacher
    plan = plan_split(pairs, settings, own_teacher=own_teacher)
    longest = max(len(tokenizer(pairs[i].response, add_special_tokens=False)["input_ids"]) for i in plan.generation)
    sized = {"eval_in_domain": len(plan.generation), "rank_items": len(plan.ranking),
             "train_examples": min(settings.train_examples, len(plan.pool)),
             "max_new_tokens": min(512, int(longest * 1.25) + 16)}
    if own_teacher:
        sized["teacher_examples"] = len(plan.teacher)
    sized.update({k: v for k, v in given.items() if k == "max_new_tokens"})
    if limit is not None:  # a generation prompt plus its reply must fit the model's positions too
        room = limit - max(len(generation_prompt(tokenizer, pairs[i], instruction, settings.max_length))
                           for i in plan.generation)
        if room < 1:
            raise ValueError(f"a generation prompt fills the model's {limit} positions; lower --max_length")
        if sized["max_new_tokens"] > room:
            notes.append(f"--max_new_tokens {sized['max_new_tokens']} → {room}: the longest generation prompt "
                         f"leaves {room} of the model's {limit} positions")
            sized["max_new_tokens"] = room
    settings = dataclasses.replace(settings, **sized)
    task = user_task(settings, pairs, instruction, plan, name=Path(str(dataset)).name, tokenizer=tokenizer)
    return settings, task, _given_teacher(teacher, settings, model_name), notes + plan.notes


def _given_teacher(teacher: str | None, settings: LabSettings, student: str) -> tuple | None:
    if teacher is None:
        return None
    if not settings.needs_teacher:
        raise ValueError("--teacher is only read by target_sft (and other teacher objectives); add it to --objectives")
    tokenizer = load_tokenizer("smollm2" if student == "tiny" else student)
    model = load_aux_model(teacher, role="teacher", student_tokenizer=tokenizer, student_name=student, dtype="float32")
    return model, {"description": f"the given teacher {teacher} (--teacher)", "key": None, "path": teacher,
                   "cached": True, "seconds": 0.0, "history": [], "given": True}


def folder_identity(folder: str, sample: int = 1 << 22) -> str:
    """A short content hash of a model folder (config, and each weight file's size, head and tail), so the
    lab's teacher cache key changes when the model does (hashing whole multi-GB files would take minutes)."""
    root = Path(folder)
    h = hashlib.sha256()
    for path in sorted(root.iterdir()):
        if path.name == "config.json" or path.suffix in (".safetensors", ".bin", ".pt"):
            size = path.stat().st_size
            h.update(f"{path.name}:{size}".encode())
            with path.open("rb") as f:
                h.update(f.read(sample))
                if size > sample:
                    f.seek(max(sample, size - sample))
                    h.update(f.read(sample))
    return h.hexdigest()[:16]
