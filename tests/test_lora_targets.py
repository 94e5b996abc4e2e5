"""LoRA targets that fit the model: for every family the suite builds (attention fused or not), a run with
the default targets (`auto`) trains one step and saves an adapter that holds lora_A and lora_B for every
module the resolved targets match (and only attention projections); a configured name that matches
nothing is refused, listing the model's module names."""
from __future__ import annotations

import pytest
import transformers as T
import yaml
from safetensors.torch import load_file
from torch import nn

from qtarget.models.lora import matches, resolve_targets
from qtarget.training import train
from test_train_support import config, tokenizer, toy_rows

SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
# family -> (config, the attention projections a reader of its modeling file expects)
FAMILIES = {
    "llama": (lambda v: T.LlamaConfig(vocab_size=v, intermediate_size=32, num_key_value_heads=2, **SMALL),
              {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "qwen2": (lambda v: T.Qwen2Config(vocab_size=v, intermediate_size=32, num_key_value_heads=1, **SMALL),
              {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "mistral": (lambda v: T.MistralConfig(vocab_size=v, intermediate_size=32, num_key_value_heads=1, **SMALL),
                {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "gemma2": (lambda v: T.Gemma2Config(vocab_size=v, intermediate_size=32, num_key_value_heads=2, head_dim=8,
                                        **SMALL), {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "granite": (lambda v: T.GraniteConfig(vocab_size=v, intermediate_size=32, num_key_value_heads=2, **SMALL),
                {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "phi": (lambda v: T.PhiConfig(vocab_size=v, intermediate_size=32, **SMALL), {"q_proj", "k_proj", "v_proj", "dense"}),
    "phi3": (lambda v: T.Phi3Config(vocab_size=v, intermediate_size=32, num_key_value_heads=2, pad_token_id=0,
                                    **SMALL), {"qkv_proj", "o_proj"}),
    "gpt2": (lambda v: T.GPT2Config(vocab_size=v, n_embd=16, n_layer=2, n_head=2, n_positions=128),
             {"c_attn", "attn.c_proj"}),
    "gpt_neox": (lambda v: T.GPTNeoXConfig(vocab_size=v, intermediate_size=32, **SMALL), {"query_key_value", "dense"}),
    "falcon": (lambda v: T.FalconConfig(vocab_size=v, hidden_size=16, num_hidden_layers=2, num_attention_heads=2),
               {"query_key_value", "dense"}),
    "opt": (lambda v: T.OPTConfig(vocab_size=v, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                  word_embed_proj_dim=16), {"q_proj", "k_proj", "v_proj", "out_proj"}),
    "bloom": (lambda v: T.BloomConfig(vocab_size=v, hidden_size=16, n_layer=2, n_head=2), {"query_key_value", "dense"}),
}


def build(family: str) -> nn.Module:
    tok = tokenizer()
    cfg = FAMILIES[family][0](len(tok))
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    return T.AutoModelForCausalLM.from_config(cfg).float()


def _attention_modules(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if "Attention" in type(m).__name__}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_targets_are_the_attention_projections_and_all_are_saved(family, tmp_path):
    model = build(family)
    expected = FAMILIES[family][1]
    targets = resolve_targets(model, ["auto"])
    assert set(targets) == expected
    adapted = sorted(n for n, m in model.named_modules() if any(matches(n, t) for t in targets)
                     and not list(m.children()))
    attention = _attention_modules(model)
    assert adapted and all(any(n.startswith(a + ".") for a in attention) for n in adapted), adapted
    assert len(adapted) == len(expected) * 2  # every listed projection in both layers

    cfg = config(tmp_path, use_lora=True, max_steps=1, max_length=48)
    result = train(cfg, model=model, tokenizer=tokenizer(), train_dataset=toy_rows(8))
    assert result.global_step == 1
    recorded = yaml.safe_load((tmp_path / "config.yaml").read_text())["lora_target_modules"]
    assert set(recorded) == expected
    keys = load_file(str(result.final_dir / "adapter_model.safetensors")).keys()
    for name in adapted:
        for part in ("lora_A", "lora_B"):
            assert any(k.endswith(f"{name}.{part}.weight") for k in keys), (name, part, sorted(keys)[:8])
    assert len(keys) == 2 * len(adapted)


def test_a_name_that_matches_nothing_is_refused_listing_the_models_modules(tmp_path):
    model = build("phi3")
    with pytest.raises(ValueError, match=r"--lora_target_modules: 'q_proj', 'v_proj' match\(es\) no module of "
                                         r"Phi3ForCausalLM.*module names are: .*gate_up_proj.*qkv_proj"):
        resolve_targets(model, ["q_proj", "v_proj", "o_proj"])
    assert resolve_targets(model, "qkv_proj,gate_up_proj") == ["qkv_proj", "gate_up_proj"]
    assert resolve_targets(model, ["all-linear"]) == ["all-linear"]
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="'q_proj', 'v_proj' match"):
        train(config(out, use_lora=True, lora_target_modules=["q_proj", "v_proj"]), model=model,
              tokenizer=tokenizer(), train_dataset=toy_rows(8))
    assert not out.exists()
