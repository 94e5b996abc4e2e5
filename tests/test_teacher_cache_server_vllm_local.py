"""--engine vllm (vllm.LLM in this process). The adapter is checked here against a stand-in `vllm`
module with vLLM's call shapes (LLM(...), SamplingParams(...), generate() -> RequestOutput with
prompt_token_ids and prompt_logprobs of Logprob(logprob, rank, decoded_token)) backed by a tiny HF
model; the real vLLM is used only where it is installed and CUDA is present (skipped otherwise)."""
from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qtarget.cli import main as qtarget_main
from qtarget.data import prepare_data
from qtarget.models import tiny_causal_lm
from qtarget.teacher_cache import TeacherCache, build_cache
from qtarget.teacher_cache.engines import VLLMLocal
from test_teacher_cache_servers import assert_same_cache, write_inputs
from test_train_support import tokenizer, toy_rows

K = 8


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def fake_vllm(calls: dict) -> types.ModuleType:
    """A stand-in for the `vllm` package: records how the adapter calls it, answers from an HF model."""
    module = types.ModuleType("vllm")
    module.__version__ = "0.0.stand-in"

    class SamplingParams:
        def __init__(self, **kw):
            calls["sampling"] = kw
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            calls["llm"] = kw
            self.model = AutoModelForCausalLM.from_pretrained(kw["model"]).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(kw["model"])

        def get_tokenizer(self):
            return self.tokenizer

        @torch.no_grad()
        def generate(self, prompts, params, use_tqdm=True):
            k = params.kw["prompt_logprobs"]
            outs = []
            for p in prompts:
                ids = p["prompt_token_ids"]
                lp = torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
                entries = [None]
                for t in range(1, len(ids)):
                    top = lp[t - 1].topk(k)
                    d = {int(i): Logprob(float(v), r + 1) for r, (i, v) in enumerate(zip(top.indices, top.values))}
                    d.setdefault(ids[t], Logprob(float(lp[t - 1, ids[t]]), int((lp[t - 1] > lp[t - 1, ids[t]]).sum()) + 1))
                    entries.append(d)
                outs.append(types.SimpleNamespace(prompt_token_ids=list(ids), prompt_logprobs=entries))
            return outs

    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module


def test_vllm_engine_adapter_builds_the_hf_cache(tmp_path, monkeypatch):
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(calls))
    common = write_inputs(tmp_path)
    teacher = tiny_causal_lm(tokenizer(), hidden_size=48, num_layers=1, num_heads=2, seed=7)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer().save_pretrained(tmp_path / "teacher")
    base = [*common, "--teacher_model", str(tmp_path / "teacher"), "--dtype", "float32", "--logprob_dtype", "float32"]
    assert qtarget_main(["teacher-cache", *base, "--output_dir", str(tmp_path / "hf")]) == 0
    assert qtarget_main(["teacher-cache", *base, "--engine", "vllm", "--output_dir", str(tmp_path / "vllm")]) == 0
    assert calls["llm"]["logprobs_mode"] == "raw_logprobs" and calls["llm"]["enable_prefix_caching"] is False
    assert calls["llm"]["max_logprobs"] >= 5 and calls["llm"]["dtype"] == "float32"
    s = calls["sampling"]
    assert s["prompt_logprobs"] == 5 and s["max_tokens"] == 1 and s["temperature"] == 1.0 and s["detokenize"] is False
    assert s["repetition_penalty"] == 1.0 and s["presence_penalty"] == 0.0 and s["frequency_penalty"] == 0.0
    data = prepare_data(str(tmp_path / "data.jsonl"), tokenizer(), max_length=48)
    assert_same_cache(tmp_path / "hf", tmp_path / "vllm", data)
    assert TeacherCache(tmp_path / "vllm").manifest.engine["version"] == "vllm 0.0.stand-in"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
                    reason="needs vllm and a CUDA device")
def test_real_vllm_engine_matches_hf(tmp_path):  # pragma: no cover - GPU only
    teacher = tiny_causal_lm(tokenizer(), hidden_size=64, num_layers=2, num_heads=2, seed=7)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer().save_pretrained(tmp_path / "teacher")
    data = prepare_data(toy_rows(14), tokenizer(), max_length=64, eval_fraction=0.2, seed=3)
    args = dict(top_k=K, rows_per_shard=4, eval_examples=data.eval, progress=False, logprob_dtype="float32")
    build_cache(teacher.cuda(), tokenizer(), data.train, tmp_path / "hf", **args)
    engine = VLLMLocal(str(tmp_path / "teacher"), top_k=K, dtype="float32", gpu_memory_utilization=0.3,
                       enforce_eager=True)
    build_cache(engine, tokenizer(), data.train, tmp_path / "vllm", **args)
    assert_same_cache(tmp_path / "hf", tmp_path / "vllm", data, atol=1e-4)
