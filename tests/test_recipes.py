"""GPU recipes and launch configs, checked on a CPU.

- Every GPU recipe in recipes/ is loaded through `qtarget train`'s config loader and run for two optimizer
  steps on tiny stand-ins of the models it names: random Qwen2 models with the real LM-head row count,
  tie setting and bias layout, saved to a folder with a tokenizer, as a hub checkpoint would be. Only what
  cannot run on a CPU in seconds is overridden (model paths, data, step count, bf16, batch size).
- The Accelerate launch configs in recipes/launch/ are read by accelerate's own launcher code and turned
  into the FSDP / DeepSpeed plugin objects that `accelerate launch` would build.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from qtarget.training import train
from qtarget.training.cli import load_config
from qtarget.models.head import head_rows

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
LAUNCH = RECIPES / "launch"
GPU_RECIPES = sorted(p for p in RECIPES.glob("*.yaml") if not p.name.startswith("cpu_"))

# LM-head rows (config.json `vocab_size`) and `tie_word_embeddings` of the models the GPU recipes name, as
# in each model's config.json on the Hugging Face Hub (huggingface.co/<name>/blob/main/config.json). The
# Hub is not reachable from the machine these were written on: the values were checked against copies of
# Qwen2 / Qwen2.5 configs in public code (1.5B class: 151936 rows, tied; 7B class: 152064 rows, untied,
# hidden 3584) and the Qwen2.5 report's "tied embeddings" for the small models. All are Qwen2ForCausalLM:
# q/k/v projections with a bias, o_proj and the LM head without. The tokenizer they share has 151,665
# tokens; the rows past it are padding.
PUBLISHED_HEADS = {
    "Qwen/Qwen2.5-Math-1.5B": (151936, True),
    "Qwen/Qwen2.5-Math-7B": (152064, False),
    "Qwen/Qwen2.5-Math-7B-Instruct": (152064, False),
    "Qwen/Qwen2.5-7B-Instruct": (152064, False),
}

# Global batch of the official runs, in rows, on the 1 node x 8 GPUs the recipes are written for
# (DFT: data.train_batch_size=256; PSFT: data.train_batch_size=64). See docs/training.md.
OFFICIAL_GLOBAL_BATCH = {
    "dft_qwen2.5-math-1.5b_numina.yaml": 256,
    "target_sft_qwen2.5-math-1.5b_teacher-7b.yaml": 256,
    "psft_qwen2.5-7b-instruct_openr1.yaml": 64,
}
GPUS = 8


def raw(recipe: Path) -> dict:
    return yaml.safe_load(recipe.read_text())


def named_models(recipe: Path) -> dict[str, str]:
    data = raw(recipe)
    return {key: data[key] for key in ("model", "teacher_model", "ref_model") if data.get(key)}


@pytest.fixture(scope="module")
def standins(tmp_path_factory, smollm2_tokenizer):
    """name -> folder of a tiny random Qwen2 with the named model's LM-head rows and tie setting."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("standins")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            rows, tied = PUBLISHED_HEADS[name]
            tok = smollm2_tokenizer
            assert len(tok) < rows  # like the real checkpoints: the head has padding rows past the tokenizer
            config = Qwen2Config(vocab_size=rows, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                 tie_word_embeddings=tied, pad_token_id=tok.pad_token_id,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(len(made))
                model = Qwen2ForCausalLM(config)
            folder = root / name.replace("/", "--")
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            made[name] = folder
        return made[name]

    return get


def chat_rows(n: int) -> list[dict]:
    """Short math-flavoured conversations (the GPU recipes' data are `messages` rows)."""
    rows = []
    for i in range(n):
        a, b = i % 7 + 1, i % 4 + 2
        answer = " ".join(["We add the numbers."] * (1 + i % 3)) + f" The answer is {a + b}."
        rows.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                  {"role": "assistant", "content": answer}]})
    return rows


def test_gpu_recipes_exist_and_name_only_models_with_a_stand_in():
    names = {p.name for p in GPU_RECIPES}
    assert set(OFFICIAL_GLOBAL_BATCH) <= names
    for recipe in GPU_RECIPES:
        for key, name in named_models(recipe).items():
            assert name in PUBLISHED_HEADS, f"{recipe.name}: {key} {name!r} has no stand-in in PUBLISHED_HEADS"


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda p: p.name)
def test_gpu_recipe_reproduces_the_official_global_batch(recipe):
    cfg = raw(recipe)
    rows_per_step = cfg["per_device_train_batch_size"] * cfg["gradient_accumulation_steps"] * GPUS
    if cfg["objective"] == "psft":  # M optimizer steps (mini-batches) per global batch, one pi_old
        assert cfg["psft_updates_per_batch"] > 1 and cfg["save_steps"] % cfg["psft_updates_per_batch"] == 0
        rows_per_step *= cfg["psft_updates_per_batch"]
    assert rows_per_step == OFFICIAL_GLOBAL_BATCH[recipe.name]


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda p: p.name)
def test_gpu_recipe_runs_two_optimizer_steps_on_stand_ins(recipe, standins, tmp_path):
    cfg_raw = raw(recipe)
    argv = ["--config", str(recipe), "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
            "--bf16", "false", "--use_cpu", "true", "--report_to", "none", "--plot", "false"]
    models = named_models(recipe)
    for key, name in models.items():
        argv += [f"--{key}", str(standins(name))]
    # Keep more than one micro-batch per step where the recipe has them, but only a few rows.
    if cfg_raw["gradient_accumulation_steps"] > 1:
        argv += ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
    cfg = load_config(argv)

    result = train(cfg, train_dataset=chat_rows(16), save_final=False)
    trainer = result.trainer

    # two optimizer steps, finite per-step metrics
    assert result.global_step == 2
    assert [row["step"] for row in result.history] == [1, 2]
    for row in result.history:
        assert math.isfinite(row["loss"]) and math.isfinite(row["nll"]) and row["nll"] > 0

    # the recipe's objective and its arguments
    assert trainer.objective.name == cfg_raw["objective"]
    assert trainer.objective.params == cfg_raw.get("objective_args", {})

    # the recipe's optimizer settings reached the optimizer
    groups = trainer.optimizer.param_groups
    assert {tuple(g["betas"]) for g in groups} == {(cfg_raw["adam_beta1"], cfg_raw["adam_beta2"])}
    assert {g["weight_decay"] for g in groups} == {cfg_raw["weight_decay"], 0.0}  # 0: biases and norms
    assert trainer.args.lr_scheduler_type.value == cfg_raw["lr_scheduler_type"]
    warmup = cfg_raw["warmup_steps"]
    expected_warmup = math.ceil(1000 * warmup) if warmup < 1 else int(warmup)
    assert cfg.get_warmup_steps(1000) == expected_warmup
    assert trainer.args.max_grad_norm == cfg_raw["max_grad_norm"]

    # the models: the published head sizes and tie settings, fp32 weights, activation checkpointing as set
    student = trainer.model
    rows, tied = PUBLISHED_HEADS[cfg_raw["model"]]
    assert head_rows(student) == rows
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tied
    assert student.model.layers[0].self_attn.q_proj.bias is not None and student.lm_head.bias is None
    assert next(student.parameters()).dtype == getattr(torch, cfg_raw["dtype"])
    assert student.is_activation_checkpointing == bool(cfg_raw.get("activation_checkpointing"))

    if cfg_raw["objective"] == "psft":
        M = cfg_raw["psft_updates_per_batch"]
        assert trainer.args.psft_updates_per_batch == M
        assert trainer.psft_refreshes == 1  # both steps inside the first global batch of M mini-batches
        assert all("clip_frac" in row for row in result.history)
        lr_lambda = trainer.lr_scheduler.lr_lambdas[0]
        assert lr_lambda(M // 2) == pytest.approx(M // 2 / cfg_raw["warmup_steps"])
        assert lr_lambda(cfg_raw["warmup_steps"]) == lr_lambda(10 * cfg_raw["warmup_steps"]) == 1.0
    if "teacher_model" in models:
        t_rows, t_tied = PUBLISHED_HEADS[cfg_raw["teacher_model"]]
        assert head_rows(trainer.teacher) == t_rows
        assert all(math.isfinite(row["kl_teacher"]) for row in result.history)


# ---- launch configs -------------------------------------------------------------------------------

def _launch_args(config_file: Path, *extra: str):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    argv = ["--config_file", str(config_file), *extra, "-m", "qtarget.cli", "train", "--config",
            str(GPU_RECIPES[0])]
    return _validate_launch_command(launch_command_parser().parse_args(argv))


def test_fsdp2_launch_config_builds_the_fsdp2_plugin(monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    path = LAUNCH / "fsdp2.yaml"
    cluster = load_config_from_file(str(path))  # unknown top-level keys raise here
    assert cluster.distributed_type.value == "FSDP" and cluster.num_processes == GPUS

    args, _, _ = _launch_args(path)
    assert args.use_fsdp and args.num_processes == GPUS and args.num_machines == 1
    env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)  # final/ gets real weights from save_model
    assert plugin.cpu_ram_efficient_loading is True
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    # transformers refuses FSDP's activation checkpointing together with the recipes' own
    if any(raw(r).get("activation_checkpointing") for r in GPU_RECIPES):
        assert plugin.activation_checkpointing is False


def test_zero3_launch_config_builds_a_stage3_deepspeed_plugin(monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    path = LAUNCH / "zero3.yaml"
    cluster = load_config_from_file(str(path))
    assert cluster.distributed_type.value == "DEEPSPEED" and cluster.num_processes == GPUS
    ds_file = ROOT / cluster.deepspeed_config["deepspeed_config_file"]
    ds = json.loads(ds_file.read_text())
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # a real final/
    assert "optimizer" not in ds and "scheduler" not in ds  # the recipe's AdamW and schedule apply

    args, defaults, mp_from_config = _launch_args(path)
    assert args.use_deepspeed and not mp_from_config  # mixed precision comes from the json, not the yaml
    # what `accelerate launch` does before starting the DeepSpeed launcher
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)  # the json path in the yaml is relative to the repository root
    plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == 3 and plugin.zero3_init_flag is False
    assert plugin.hf_ds_config.config["train_micro_batch_size_per_gpu"] == "auto"


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda p: p.name)
def test_zero3_json_auto_values_are_filled_from_the_recipe(recipe, tmp_path):
    pytest.importorskip("deepspeed")  # transformers' DeepSpeed config needs the package
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    cfg_raw = raw(recipe)
    cfg = load_config(["--config", str(recipe), "--output_dir", str(tmp_path), "--use_cpu", "true",
                       "--report_to", "none", "--deepspeed", str(LAUNCH / "zero3.json")])
    try:
        ds = cfg.hf_deepspeed_config.config
        assert is_deepspeed_zero3_enabled()
        assert ds["train_micro_batch_size_per_gpu"] == cfg_raw["per_device_train_batch_size"]
        assert ds["gradient_accumulation_steps"] == cfg_raw["gradient_accumulation_steps"]
        assert ds["gradient_clipping"] == cfg_raw["max_grad_norm"]
        assert ds["bf16"]["enabled"] is cfg_raw["bf16"] is True
    finally:  # transformers keeps a process-wide "ZeRO-3 is on" flag that would change later model loads
        unset_hf_deepspeed_config()
        del cfg
    assert not is_deepspeed_zero3_enabled()


@pytest.mark.parametrize("name", ["fsdp2.yaml", "zero3.yaml"])
def test_multi_node_flags_override_the_launch_config(name):
    args, _, _ = _launch_args(LAUNCH / name, "--num_machines", "2", "--num_processes", "16", "--machine_rank", "1",
                              "--main_process_ip", "10.0.0.1", "--main_process_port", "29500")
    assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 16, 1)
    assert (args.main_process_ip, args.main_process_port) == ("10.0.0.1", 29500)


def test_psft_data_script_builds_the_official_conversation():
    spec = importlib.util.spec_from_file_location("prep", RECIPES / "data" / "prepare_openr1_math_46k.py")
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    row = {"prompt": [{"role": "system", "content": "ignored"}, {"role": "user", "content": "Find x."}],
           "target": [{"role": "assistant", "content": "x = 2. \\boxed{2}"}]}
    messages = prep.to_messages(row)["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == "Please reason step by step, and put your final answer within \\boxed{}."
    assert messages[1]["content"] == "Find x." and messages[2]["content"] == "x = 2. \\boxed{2}"
