"""Generation backends behind one interface: prompts as token ids in, `Sample`s out.

- `HFGenerator`: Hugging Face `generate` (batched, KV cache, left padding). It records the entropy of the
  model's next-token distribution pi_theta (temperature 1, before temperature / top-p) at every generated
  position through a logits processor, so no [steps, B, V] scores are kept.
- `VLLMGenerator`: vLLM, when it is installed; entropy is approximated from the top-20 log-probs (a lower
  bound on the full entropy).

temperature == 0 means greedy decoding. Sampling is seeded: the same prompts, seed and batch give the same
samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessorList

__all__ = ["Sample", "Generator", "HFGenerator", "VLLMGenerator", "vllm_available", "token_entropy"]


@dataclass
class Sample:
    """One generated response.

    text: decoded response (special tokens and the final EOS removed).
    token_ids: generated ids, including the EOS when generation stopped on one.
    num_tokens: len(token_ids).
    cut: True when generation hit `max_new_tokens` without an EOS.
    entropy: mean over the generated positions of H(pi_theta(. | prefix)) in nats; None if unavailable.
    """

    text: str
    token_ids: list[int]
    num_tokens: int
    cut: bool
    entropy: float | None


class Generator(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> list[Sample]:
        """One sample per prompt (repeat a prompt to get several)."""
        ...


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, in nats. [..., V] -> [...]; masked (-inf) entries allowed."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def _check_params(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


class _EntropyRecorder:
    """A logits processor that stores the entropy [B] of the incoming (raw) scores at every step."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(token_entropy(scores).cpu())
        return scores


class HFGenerator:
    """Batched generation with a Hugging Face causal LM.

    Prompts are left-padded to the longest in the batch; `batch_size` prompts go through `generate` at a
    time. EOS ids: the model's generation config plus the tokenizer's EOS.
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8, eos_token_ids: Sequence[int] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        if eos_token_ids is None:
            ids: list[int] = []
            gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            for e in ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])) + [tokenizer.eos_token_id]:
                if e is not None and e not in ids:
                    ids.append(int(e))
            eos_token_ids = ids
        if not eos_token_ids:
            raise ValueError("no EOS token id: the tokenizer has no eos_token_id; pass eos_token_ids=")
        self.eos_token_ids = list(eos_token_ids)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_ids[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _batch_inputs(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> list[Sample]:
        """Samples for `prompts` (lists of token ids), in order. Runs in chunks of `batch_size`."""
        _check_params(max_new_tokens, temperature, top_p)
        out: list[Sample] = []
        # fork the RNG so seeding here does not disturb the caller's random stream
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), self.batch_size):
                out.extend(self._generate_batch(prompts[start:start + self.batch_size], max_new_tokens,
                                                temperature, top_p))
        return out

    def _generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
                        top_p: float) -> list[Sample]:
        input_ids, attention_mask = self._batch_inputs(prompts)
        sampling = temperature > 0
        cfg_kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens, do_sample=sampling, num_beams=1, pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids, return_dict_in_generate=True, use_cache=True,
        )
        if sampling:
            cfg_kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
        config = GenerationConfig(**cfg_kwargs)
        recorder = _EntropyRecorder()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                result = self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                    logits_processor=LogitsProcessorList([recorder]),
                )
        finally:
            self.model.train(was_training)
        generated = result.sequences[:, input_ids.shape[1]:].cpu()
        ent = torch.stack(recorder.steps, dim=0) if recorder.steps else torch.zeros(0, len(prompts))  # [S, B]
        eos = torch.tensor(self.eos_token_ids)
        samples = []
        for i in range(generated.shape[0]):
            row = generated[i]
            is_eos = torch.isin(row, eos).nonzero()
            if len(is_eos):
                n, cut = int(is_eos[0]) + 1, False
            else:
                n, cut = int(row.shape[0]), True
            ids = row[:n].tolist()
            text_ids = ids[:-1] if not cut else ids
            text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
            entropy = float(ent[:n, i].mean()) if n > 0 and ent.shape[0] >= n else None
            samples.append(Sample(text=text, token_ids=ids, num_tokens=n, cut=cut, entropy=entropy))
        return samples


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401, PLC0415 - optional (GPU serving)
    except ImportError:
        return False
    return True


class VLLMGenerator:  # pragma: no cover - needs vllm and a GPU
    """The same interface on vLLM. `model` is a path or hub id; extra kwargs go to `vllm.LLM`."""

    TOPK_LOGPROBS = 20

    def __init__(self, model: str, *, tokenizer: Any = None, seed: int = 0, **llm_kwargs: Any):
        if not vllm_available():
            raise ImportError("VLLMGenerator needs the `vllm` package; `pip install vllm` (GPU only)")
        import vllm  # noqa: PLC0415 - optional

        self.llm = vllm.LLM(model=str(model), seed=seed, **llm_kwargs)
        self.tokenizer = tokenizer or self.llm.get_tokenizer()

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> list[Sample]:
        import vllm  # noqa: PLC0415 - optional
        from vllm.inputs import TokensPrompt  # noqa: PLC0415

        _check_params(max_new_tokens, temperature, top_p)
        # one seed per prompt, so repeated prompts give different samples
        params = [vllm.SamplingParams(
            n=1, temperature=float(temperature), top_p=float(top_p) if temperature > 0 else 1.0,
            max_tokens=max_new_tokens, seed=seed + i, logprobs=self.TOPK_LOGPROBS,
        ) for i in range(len(prompts))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        samples = []
        for o in outs:
            c = o.outputs[0]
            ents = []
            for step in c.logprobs or []:
                lps = [lp.logprob for lp in step.values()]
                ents.append(-sum(math.exp(x) * x for x in lps if x > -math.inf))
            samples.append(Sample(
                text=c.text, token_ids=list(c.token_ids), num_tokens=len(c.token_ids),
                cut=c.finish_reason == "length", entropy=sum(ents) / len(ents) if ents else None,
            ))
        return samples
