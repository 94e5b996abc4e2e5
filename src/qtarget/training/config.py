"""`QTargetConfig`: `transformers.TrainingArguments` plus what a q-target run needs (model, data,
objective, auxiliary models, PSFT schedule, LoRA). One flat set of keys, so a YAML recipe and
`--key value` flags map onto it one to one."""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

import yaml
from transformers import TrainingArguments

from qtarget.cli_args import check_number
from qtarget.objectives import get_objective
from qtarget.ops.sparse_teacher import TAILS


# key -> its meaningful range (cli_args.check_number's arguments); None always passes where the key allows it.
RANGES: dict[str, dict[str, Any]] = {
    "per_device_train_batch_size": dict(low=1, integer=True),
    "per_device_eval_batch_size": dict(low=1, integer=True),
    "gradient_accumulation_steps": dict(low=1, integer=True),
    "eval_accumulation_steps": dict(low=1, integer=True),
    "num_train_epochs": dict(low=0),
    "learning_rate": dict(low=0),
    "weight_decay": dict(low=0),
    "adam_beta1": dict(low=0, high=1, high_open=True),
    "adam_beta2": dict(low=0, high=1, high_open=True),
    "adam_epsilon": dict(low=0, low_open=True),
    "max_grad_norm": dict(low=0),
    "warmup_steps": dict(low=0),
    "label_smoothing_factor": dict(low=0, high=1, high_open=True),
    "logging_steps": dict(low=0, low_open=True),
    "save_steps": dict(low=0, low_open=True),
    "eval_steps": dict(low=0, low_open=True),
    "eval_delay": dict(low=0),
    "save_total_limit": dict(low=1, integer=True),
    "seed": dict(low=0, integer=True),
    "data_seed": dict(low=0, integer=True),
    "dataloader_num_workers": dict(low=0, integer=True),
    "eval_fraction": dict(low=0, high=1, high_open=True),
    "max_rows": dict(low=1, integer=True),
    "max_length": dict(low=2, integer=True),
    "prompt_loss_weight": dict(low=0),
    "chunk_size": dict(low=1, integer=True),
    "psft_updates_per_batch": dict(low=1, integer=True),
    "lora_r": dict(low=1, integer=True),
    "lora_alpha": dict(low=0, low_open=True),
    "lora_dropout": dict(low=0, high=1, high_open=True),
}


def check_ranges(config: Any) -> None:
    """Every numeric key of `config` inside its meaningful range (RANGES), named by flag."""
    for key, bounds in RANGES.items():
        if hasattr(config, key):
            check_number(key, getattr(config, key), **bounds)
    steps = config.max_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or (steps < 1 and steps != -1):
        raise ValueError(f"--max_steps must be an integer >= 1 (or -1: train num_train_epochs), got {steps!r}")
    if steps == -1 and not config.num_train_epochs > 0:
        raise ValueError(f"--num_train_epochs must be > 0 when --max_steps is not set, got {config.num_train_epochs!r}")


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class QTargetConfig(TrainingArguments):
    # --- model & data ---
    model: str | None = _f(None, "Student model: a hub id or a local folder (AutoModelForCausalLM).")
    dataset: str | None = _f(None, "Training data: a .jsonl/.json/.parquet/.csv file, a save_to_disk folder or "
                                   "a hub dataset id. Rows: messages, conversations (ShareGPT), prompt+completion (TRL), "
                                   "prompt+response, instruction+output (Alpaca) or text; optional token_weights.")
    dataset_config: str | None = _f(None, "Hub dataset configuration name (datasets.load_dataset's `name`).")
    dataset_split: str = _f("train", "Split to read from a hub dataset or a DatasetDict folder.")
    eval_dataset: str | None = _f(None, "Separate eval data (same formats); otherwise `eval_fraction` of the rows.")
    eval_fraction: float = _f(0.0, "Fraction of rows held out for evaluation (0 = none).")
    max_rows: int | None = _f(None, "Use only the first N rows of the dataset.")
    max_length: int | None = _f(1024, "Truncate examples to this many tokens (the count of truncated rows is reported).")
    response_only: bool = _f(True, "Supervise only response / assistant tokens (prompt tokens get label -100).")
    prompt_loss_weight: float = _f(0.0, "Also supervise the tokens outside the response (prompt, system, template), "
                                        "each token's loss weighted by this (the response's by 1), with any objective; "
                                        "the mean is over all supervised tokens (WIT, arXiv 2507.07817). 0 = off.")
    chat_template: bool | None = _f(None, "Prompt/response rows as a user and an assistant turn of the chat template: "
                                          "auto (None) decides per format (Alpaca yes, plain prompt/completion no; "
                                          "docs/data.md), true / false for every pair.")
    strict_rows: bool = _f(False, "Refuse (instead of skip and count) a row whose reply cannot be masked, e.g. one "
                                  "the chat template refuses.")
    packing: bool = _f(False, "Pack several examples per row (position ids restart per example; no cross-example attention).")
    dtype: str = _f("auto", "Weights dtype when loading models: auto, float32, bfloat16 or float16.")
    # --- objective ---
    objective: str = _f("sft", "Objective name (see `qtarget objectives`), e.g. sft, dft, psft, asft, target_sft.")
    objective_args: dict = _f({}, "Objective parameters, e.g. {eta: 0.5} in YAML or `eta=0.5,lam=0.1` on the command line.")
    chunk_size: int | None = _f(None, "Token chunk size of the fused loss engine (None = automatic).")
    teacher_model: str | None = _f(None, "Teacher (target_sft, kd, distill_hybrid): hub id or folder; must share the "
                                         "student's vocabulary.")
    teacher_cache: str | None = _f(None, "Folder of a teacher cache built by `qtarget teacher-cache` (the teacher's top-k "
                                         "log-probs per supervised token): train from it with no teacher in memory. It must "
                                         "match this run's data, tokenizer and student vocabulary.")
    teacher_tail: str = _f("student", "With teacher_cache: where the teacher's mass outside the cached top-k goes: "
                                      "'student' (spread in proportion to the student's sg(p)), 'renormalize' (dropped; "
                                      "top-k renormalised) or 'uniform' (spread evenly). See docs/teacher_cache.md.")
    ref_model: str | None = _f(None, "Reference / base model (sft_kl, asft). Default: the frozen initial student "
                                     "(with LoRA: the student with adapters disabled, no second copy).")
    teacher_dtype: str | None = _f(None, "Weights dtype of the teacher model: auto, float32, bfloat16 or float16 "
                                         "(default: `dtype`). A bfloat16 teacher next to a float32 student holds half "
                                         "the memory; the fused loss forms its logits in bfloat16 and does the loss "
                                         "math in float32.")
    ref_dtype: str | None = _f(None, "Weights dtype of the reference model (--ref_model, or the frozen copy of the "
                                     "initial student; not used with LoRA, whose reference is the student itself): "
                                     "auto, float32, bfloat16 or float16 (default: `dtype`).")
    psft_updates_per_batch: int = _f(8, "PSFT: optimizer steps (mini-batches) per global batch that share one pi_old. "
                                        "One optimizer step consumes one mini-batch of per_device_train_batch_size x "
                                        "gradient_accumulation_steps x world_size rows.")
    # --- LoRA ---
    use_lora: bool = _f(False, "Train a LoRA adapter (peft) instead of the full model.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: float = _f(32.0, "LoRA alpha.")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_target_modules: list = _f(["auto"], "Module names LoRA adapts. auto: the attention projections the model "
                                             "has (q/k/v/o_proj on Llama-like models, qkv_proj + o_proj on Phi-3, "
                                             "query_key_value + dense on Falcon / GPT-NeoX, c_attn + attn.c_proj on "
                                             "GPT-2, ...); all-linear: every linear layer but the head. A name that "
                                             "matches no module is refused, listing the model's module names.")
    # --- outputs ---
    plot: bool = _f(True, "Write curves.png (loss, nll, p_y, entropy, gamma, ...) at the end.")
    resume: str | None = _f(None, "Resume: 'last' (newest checkpoint in output_dir) or a checkpoint folder. Refused "
                                  "when the checkpoint was trained on other data or settings.")
    overwrite_output_dir: bool = _f(False, "Replace the outputs (checkpoints, metrics, final model) of an earlier run "
                                           "in output_dir; without it (or --resume) such a folder is refused.")
    # --- TrainingArguments defaults changed for this library ---
    logging_steps: float = _f(1, "Log every N optimizer steps (default 1: per-step metrics).")
    remove_unused_columns: bool = _f(False, "Kept False: batches carry token_weights and old log-probs.")
    report_to: Any = _f("auto", "'auto' = tensorboard when installed, else none; or any TrainingArguments value.")
    save_strategy: Any = _f("steps", "Checkpoint strategy: steps, epoch, no.")
    save_steps: float = _f(500, "Checkpoint every N optimizer steps.")
    prediction_loss_only: bool = _f(True, "Evaluation computes the loss and metrics only.")

    def __post_init__(self) -> None:
        if self.output_dir is None:
            raise ValueError("output_dir is required (--output_dir DIR)")
        if self.report_to == "auto":
            try:
                import tensorboard  # noqa: F401, PLC0415 - optional logger

                self.report_to = ["tensorboard"]
            except ImportError:
                self.report_to = "none"
        if isinstance(self.objective_args, str):
            self.objective_args = parse_kv(self.objective_args, "objective_args")
        if not isinstance(self.objective_args, dict):
            raise ValueError(f"--objective_args must be a mapping of parameter names to values (e.g. eta=0.5,lam=0.1), "
                             f"got {self.objective_args!r}")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        check_ranges(self)
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}")
        for key in ("teacher_dtype", "ref_dtype"):
            if getattr(self, key) not in (None, "auto", "float32", "bfloat16", "float16"):
                raise ValueError(f"{key} must be one of auto, float32, bfloat16, float16; got {getattr(self, key)!r}")
        if self.packing and self.max_length is None:
            raise ValueError("packing=True needs max_length")
        if self.prompt_loss_weight and not self.response_only:
            raise ValueError("--prompt_loss_weight needs --response_only true (with response_only false every token "
                             "is already supervised at weight 1)")
        if self.teacher_tail not in TAILS:
            raise ValueError(f"teacher_tail must be one of {', '.join(TAILS)}; got {self.teacher_tail!r}")
        try:
            self.build_objective()  # unknown objective / parameter -> error now, before any model loads
        except (TypeError, ValueError) as e:
            if not self.objective_args:
                raise
            shown = ",".join(f"{k}={v}" for k, v in self.objective_args.items())
            raise ValueError(f"--objective_args {shown!r} (objective {self.objective!r}): {e}") from None
        super().__post_init__()

    def aux_dtype(self, role: str) -> str:
        """The weights dtype of the auxiliary model `role` ("teacher" or "ref"): its own key, else `dtype`."""
        return getattr(self, f"{role}_dtype") or self.dtype

    def build_objective(self):
        """The objective of this config, built once (and again only if `objective`/`objective_args` change)."""
        key = (self.objective, repr(sorted(dict(self.objective_args).items())))
        cached = self.__dict__.get("_built_objective")
        if cached is None or cached[0] != key:
            cached = (key, get_objective(self.objective, **dict(self.objective_args)))
            self.__dict__["_built_objective"] = cached
        return cached[1]

    @property
    def objective_needs(self) -> frozenset[str]:
        return frozenset(self.build_objective().needs)

    def to_plain_dict(self) -> dict[str, Any]:
        """Every field with a YAML-safe value (for config.yaml of the resolved run)."""
        out = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            v = getattr(self, f.name)
            out[f.name] = _plain(v)
        return out


def _plain(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def parse_kv(text: str, where: str) -> dict[str, Any]:
    """'a=1,b=x' (or a YAML/JSON mapping) -> {'a': 1, 'b': 'x'}; values are parsed as YAML scalars.
    A malformed text is a ValueError naming `--where` and the expected form."""
    form = "key=value pairs separated by commas (e.g. eta=0.5,lam=0.1) or a mapping ({eta: 0.5, lam: 0.1})"
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = None
        if not isinstance(value, dict):
            raise ValueError(f"--{where}: cannot read {text!r}: expected {form}")
        return value
    out = {}
    for part in text.split(","):
        k, eq, v = part.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"--{where}: cannot read {part.strip()!r} in {text!r}: expected {form}")
        try:
            out[k.strip()] = yaml.safe_load(v.strip())
        except yaml.YAMLError:
            raise ValueError(f"--{where}: cannot read the value of {k.strip()!r} ({v.strip()!r}): expected {form}; "
                             f"quote a value that holds a comma") from None
    return out


def config_fields() -> dict[str, dataclasses.Field]:
    """All settable keys of QTargetConfig (init fields), by name."""
    return {f.name: f for f in dataclasses.fields(QTargetConfig) if f.init and not f.name.startswith("_")}
