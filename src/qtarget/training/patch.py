"""The loss inside the forward: `patch(model, objective, ...)` makes a causal LM's own forward return
the fused objective loss, so any trainer (QTargetTrainer, TRL's SFTTrainer, HF Trainer, a plain loop)
and any sharding engine (DDP, FSDP1/2, DeepSpeed ZeRO-3) sees a normal forward whose output holds the loss.

After `patch`, `model(input_ids, attention_mask, labels=labels, num_items_in_batch=n)` returns a
`FusedLossOutput` with `loss` = sum of the per-token objective / n (the token mean without n), its
`metrics` and `per_token_loss`; without `labels` the model's original forward runs (generation is
unchanged). The [tokens x vocab] logits are never built:

    decoder(input_ids, ...) -> hidden [B, T, H]
    lm_head(hidden[:, :-1])  -- inside the head module's own forward, where FSDP / ZeRO-3 have gathered
                                its parameters, the fused engine computes the loss from the effective
                                head (LoRA on the head included) and returns it as the head's output.

Auxiliary models (teacher, reference) go through their own forwards the same way: each runs its
decoder and hands out its head (cloned, so it outlives the engine's re-sharding) for the student's
engine to form its logits chunk by chunk. A PEFT student's reference can be the student itself with
its adapters disabled (no second copy). Extra per-token inputs ride along as forward keywords, each
[B, T] (or [B, T, k]) aligned with `labels`: `old_logprobs`, `token_weights`, `loss_weights` (per-position
weights of the loss, e.g. prompt tokens at `prompt_loss_weight`, whatever the objective), and a cached sparse
teacher `teacher_topk_ids`, `teacher_topk_logprobs`, `teacher_topk_log_tail`.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import types
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer
from transformers.modeling_outputs import ModelOutput

from qtarget.models.head import LMHead, causal_lm_of, head_of_module, head_rows, unwrap_module
from qtarget.models.load import freeze
from qtarget.objectives import Objective, get_objective
from qtarget.ops import fused_token_loss
from qtarget.ops.sparse_teacher import TeacherTopK, check_tail

SFT = get_objective("sft")
TOPK_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_topk_log_tail")
EXTRA_KEYS = ("old_logprobs", "token_weights", "loss_weights") + TOPK_KEYS
TEACHER_FROM_BATCH = "batch"


@dataclass
class FusedLossOutput(ModelOutput):
    """loss []; per_token_loss [B, T-1] (detached, 0 where ignored); metrics (floats, token means);
    label_logprobs [B, T] (only with qtarget_label_logprobs=True: log p(labels[t]), 0 at t = 0 and
    where ignored). With TRL's `fused_lm_head=True` also log_probs / label_mask / entropy / is_top1 [B, T-1]
    such that TRL's -sum(log_probs) / n is this objective's loss."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    per_token_loss: Tensor | None = None
    metrics: dict | None = None
    label_logprobs: Tensor | None = None
    log_probs: Tensor | None = None
    label_mask: Tensor | None = None
    entropy: Tensor | None = None
    is_top1: Tensor | None = None


@dataclass(eq=False)
class PatchState:
    """What a patched model holds (outside nn.Module registration, so aux models are not its submodules)."""

    objective: Objective
    teacher: nn.Module | None  # a (possibly wrapped) patched aux model, or None
    teacher_tail: str
    ref: nn.Module | None  # a separate frozen reference model (patched aux)
    ref_from_adapters: bool  # the reference is this model with its PEFT adapters disabled
    vocab_size: int
    engine: dict[str, Any]
    original_forward: Any
    bound_forward: Any = None  # the forward `patch` installed (to tell whether someone replaced it since)
    hooks: tuple = ()  # handles of the hooks `patch` registered (removed by unpatch / a new patch)


@dataclass(eq=False)
class _HeadRequest:
    """Set on the head module for one call of its forward."""

    mode: str  # "capture" (hand out the head) or "loss" (run the fused engine)
    vocab_size: int | None = None
    engine_args: dict | None = None
    head: LMHead | None = None
    result: Any = None


# --------------------------------------------------------------------------- the head's forward
def _head_forward(self: nn.Module, hidden: Tensor, *args, **kwargs):
    request: _HeadRequest | None = self.__dict__.get("_qtarget_request")
    if request is None:
        return self._qtarget_original_forward(hidden, *args, **kwargs)
    head = head_of_module(self, self.__dict__["_qtarget_config"])
    if request.mode == "capture":
        request.head = head.cloned().on_vocab(request.vocab_size)
        return hidden.new_zeros(())
    request.result = fused_token_loss(request.engine_args.pop("objective"), hidden, head,
                                      request.engine_args.pop("labels"), **request.engine_args)
    return request.result.loss


def _head_module(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(module to call, innermost module whose forward is patched) for lm's output embedding now
    (PEFT or FSDP may have replaced it since `patch`)."""
    outer = lm.get_output_embeddings()
    if outer is None:
        raise ValueError(f"{type(lm).__name__} has no output embedding (LM head)")
    inner = unwrap_module(outer)
    if "_qtarget_original_forward" not in inner.__dict__:
        inner.__dict__["_qtarget_original_forward"] = inner.forward
        inner.__dict__["_qtarget_config"] = getattr(lm, "config", None)
        inner.forward = types.MethodType(_head_forward, inner)
    return outer, inner


def _call_head(lm: nn.Module, hidden: Tensor, request: _HeadRequest) -> _HeadRequest:
    outer, inner = _head_module(lm)
    inner.__dict__["_qtarget_request"] = request
    try:
        out = outer(hidden)
    finally:
        inner.__dict__.pop("_qtarget_request", None)
    if request.mode == "loss":
        request.result.loss = out  # the head's output, as the engine's hooks saw it
    return request


# ------------------------------------------------------------------------------- the forwards
_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")


def _decoder_hidden(lm: nn.Module, inputs: dict[str, Any], kwargs: dict[str, Any]) -> Tensor:
    kwargs = {k: v for k, v in kwargs.items() if k not in ("use_cache", "logits_to_keep", "return_dict",
                                                          "output_hidden_states", "output_attentions")}
    out = lm.get_decoder()(**{k: v for k, v in inputs.items() if v is not None}, use_cache=False, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    """The PEFT adapter layers of `model`: modules whose `disable_adapters` is a flag. (transformers'
    PreTrainedModel has enable_adapters / disable_adapters *methods* (PeftAdapterMixin) on every model,
    adapters or not, so the names alone do not tell a PEFT student from a plain one.)"""
    return [m for m in model.modules() if hasattr(m, "enable_adapters") and isinstance(
        getattr(m, "disable_adapters", None), bool)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Every PEFT adapter layer (LoRA, modules_to_save) of `model` switched off for the block."""
    layers = [m for m in adapter_layers(model) if not m.disable_adapters]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def _aux_forward(self: nn.Module, *args, qtarget_aux: bool = False, qtarget_vocab: int | None = None, **kwargs):
    if not qtarget_aux:
        return self.__dict__["_qtarget_aux"](*args, **kwargs)  # the original forward
    inputs = {k: kwargs.pop(k, None) for k in _MODEL_KEYS}
    with torch.no_grad():
        hidden = _decoder_hidden(self, inputs, kwargs)
        request = _call_head(self, hidden[:, :1], _HeadRequest("capture", vocab_size=qtarget_vocab))
    return AuxOutput(hidden_states=hidden, head=request.head)


@dataclass
class AuxOutput(ModelOutput):
    hidden_states: Tensor | None = None  # [B, T, H_aux]
    head: LMHead | None = None  # cloned, on the student's vocabulary


def aux_hidden_and_head(aux: nn.Module, inputs: dict[str, Any], vocab_size: int) -> tuple[Tensor, LMHead]:
    """(hidden [B, T, H_aux], its head put on `vocab_size` rows, cloned) of a frozen auxiliary model
    (teacher / reference), through its own (possibly sharded) forward. `inputs`: input_ids,
    attention_mask, position_ids. The model is frozen and patched on first use."""
    if "_qtarget_aux" not in causal_lm_of(aux).__dict__:
        patch_aux(aux)
    inputs = {k: inputs.get(k) for k in _MODEL_KEYS}
    with torch.no_grad():
        out = aux(**{k: v for k, v in inputs.items() if v is not None}, qtarget_aux=True, qtarget_vocab=vocab_size)
    return out.hidden_states, out.head


def _shift(value: Tensor | None) -> Tensor | None:
    return None if value is None else value[:, 1:]


def _fused_forward(self: nn.Module, *args, qtarget_fused_lm_head: bool = False, **kwargs):
    """The patched forward; counts how deep calls are nested, so the decoder's guard can tell a call through
    it from one that bypasses it. `qtarget_fused_lm_head` is TRL's `fused_lm_head` routed past TRL's own
    wrapper (see `_route_fused_lm_head`)."""
    if qtarget_fused_lm_head:
        kwargs["fused_lm_head"] = True
    self.__dict__["_qtarget_depth"] = self.__dict__.get("_qtarget_depth", 0) + 1
    try:
        return _patched_forward(self, *args, **kwargs)
    finally:
        self.__dict__["_qtarget_depth"] -= 1


def _patched_forward(self: nn.Module, input_ids=None, attention_mask=None, position_ids=None, labels=None,
                     num_items_in_batch=None, *, old_logprobs=None, token_weights=None, loss_weights=None,
                     teacher_topk_ids=None, teacher_topk_logprobs=None, teacher_topk_log_tail=None, qtarget_objective=None,
                     qtarget_label_logprobs: bool = False, fused_lm_head: bool = False, **kwargs):
    state: PatchState = self.__dict__["_qtarget"]
    if labels is None:
        return state.original_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      **kwargs)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
              "inputs_embeds": kwargs.pop("inputs_embeds", None)}
    shifted = labels[:, 1:]
    objective = SFT if qtarget_label_logprobs else get_objective(qtarget_objective or state.objective)
    engine: dict[str, Any] = dict(state.engine)
    needs = objective.needs
    if "teacher" in needs:
        topk = (teacher_topk_ids, teacher_topk_logprobs, teacher_topk_log_tail)
        if all(t is not None for t in topk):
            engine["teacher_topk"] = TeacherTopK(*(t[:, 1:] for t in topk))
            engine["teacher_tail"] = state.teacher_tail
        elif state.teacher is not None:
            hidden_t, engine["teacher_head"] = aux_hidden_and_head(state.teacher, inputs, state.vocab_size)
            engine["teacher_hidden"] = hidden_t[:, :-1]
        else:
            raise ValueError(f"objective {objective.name!r} needs the teacher: the batch has no "
                             f"{', '.join(TOPK_KEYS)} (a teacher cache) and no teacher model was patched in")
    if "ref" in needs:
        if state.ref is not None:
            hidden_r, engine["ref_head"] = aux_hidden_and_head(state.ref, inputs, state.vocab_size)
        elif state.ref_from_adapters:
            was_training = self.training
            self.eval()
            try:
                with torch.no_grad(), adapters_disabled(self):
                    hidden_r = _decoder_hidden(self, inputs, dict(kwargs))
                    engine["ref_head"] = _call_head(self, hidden_r[:, :1],
                                                    _HeadRequest("capture", vocab_size=state.vocab_size)).head
            finally:
                self.train(was_training)
        else:
            raise ValueError(f"objective {objective.name!r} needs a reference model; none was patched in")
        engine["ref_hidden"] = hidden_r[:, :-1]
    if "old_logprobs" in needs:
        if old_logprobs is None:
            raise ValueError(f"objective {objective.name!r} needs `old_logprobs` [B, T] (log pi_old of the labels) "
                             f"in the batch; QTargetTrainer computes them on PSFT's schedule")
        engine["old_logprobs"] = _shift(old_logprobs)
    if "token_weights" in needs:
        engine["token_weights"] = _shift(token_weights)
    if loss_weights is not None and not qtarget_label_logprobs:  # per-position data weights, any objective
        engine["loss_weights"] = _shift(loss_weights)

    hidden = _decoder_hidden(self, inputs, kwargs)[:, :-1]
    if qtarget_label_logprobs or fused_lm_head:
        engine["reduction"] = "sum"
    elif num_items_in_batch is not None:
        engine["normalizer"] = torch.as_tensor(num_items_in_batch, dtype=torch.float32,
                                               device=hidden.device).clamp_min(1.0)
    engine.update(objective=objective, labels=shifted.to(hidden.device))
    result = _call_head(self, hidden, _HeadRequest("loss", engine_args=engine)).result
    out = FusedLossOutput(loss=result.loss, per_token_loss=result.per_token, metrics=result.metrics)
    if qtarget_label_logprobs:
        label_logprobs = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
        label_logprobs[:, 1:] = -result.per_token.detach()
        out.label_logprobs = label_logprobs
    if fused_lm_head:
        _add_trl_fields(out, shifted.to(hidden.device))
    return out


def _add_trl_fields(out: FusedLossOutput, labels: Tensor) -> None:
    """TRL's SFTTrainer takes loss = -sum(log_probs) / n: give it -per_token, with the gradient of the
    summed loss riding on the first supervised position (value 0)."""
    mask = labels != -100
    log_probs = -out.per_token_loss.detach().clone()
    if bool(mask.any()):
        first = tuple(mask.nonzero()[0].tolist())
        carrier = out.loss - out.loss.detach()
        log_probs = log_probs.index_put((torch.tensor([first[0]]), torch.tensor([first[1]])), -carrier.reshape(1),
                                        accumulate=True)
    elif out.loss.requires_grad:
        log_probs = log_probs + 0.0 * out.loss
    metrics = out.metrics or {}
    out.log_probs = log_probs
    out.label_mask = mask
    out.entropy = mask.float() * float(metrics.get("entropy", 0.0))
    out.is_top1 = mask.float() * float(metrics.get("top1", 0.0))


# ------------------------------------------------- a forward replaced after patching (TRL, Liger)
# TRL's SFTTrainer wraps the forward of the model it is given in __init__ (`add_fused_lm_head`): with
# `fused_lm_head=True` its wrapper runs the decoder and its own NLL head, and never calls the forward it
# wrapped. A model patched before the trainer was built would silently train plain NLL. Two hooks keep
# that from happening: the model's forward pre-hook renames `fused_lm_head` to `qtarget_fused_lm_head`,
# so TRL's wrapper passes the call on to the patched forward (which returns TRL's fields for this
# objective); and the decoder's pre-hook refuses a training forward that reaches the decoder outside the
# patched forward once that forward was replaced (PEFT calls `forward` without hooks; Liger replaces it).
def _route_fused_lm_head(module: nn.Module, args: tuple, kwargs: dict):
    if kwargs.get("fused_lm_head") and patched_state(module) is not None:
        kwargs = dict(kwargs)
        kwargs["qtarget_fused_lm_head"] = bool(kwargs.pop("fused_lm_head"))
        return args, kwargs
    return None


def _guard_decoder(lm_ref: weakref.ref, decoder: nn.Module, args: tuple, kwargs: dict) -> None:
    lm = lm_ref()
    state = lm.__dict__.get("_qtarget") if lm is not None else None
    if state is None or lm.__dict__.get("_qtarget_depth", 0) > 0 or lm.__dict__.get("forward") is state.bound_forward:
        return
    if lm.training and torch.is_grad_enabled():
        raise RuntimeError(
            f"qtarget.patch({type(lm).__name__}, {state.objective.name!r}) was bypassed: the model's forward was "
            f"replaced after patching (TRL's SFTTrainer installs its own fused LM head on the model it is given; "
            f"Liger kernels replace the forward too), so this training step would not compute {state.objective.name!r}."
            f" Patch the built trainer instead: qtarget.patch(trainer, {state.objective.name!r}, ...)")


def _register_hooks(model: nn.Module, lm: nn.Module) -> tuple:
    hooks = [m.register_forward_pre_hook(_route_fused_lm_head, with_kwargs=True)
             for m in dict.fromkeys((model, lm))]
    hooks.append(lm.get_decoder().register_forward_pre_hook(functools.partial(_guard_decoder, weakref.ref(lm)),
                                                            with_kwargs=True))
    return tuple(hooks)


# ------------------------------------------------------------------------------------ patching
def _check_wrapper(model: nn.Module) -> None:
    if isinstance(model, nn.DataParallel):
        raise ValueError("torch.nn.DataParallel is not supported by qtarget's fused loss (it replicates the model "
                         "on every call); use DistributedDataParallel (torchrun / accelerate launch)")


def patch_aux(model: nn.Module) -> nn.Module:
    """Freeze an auxiliary model (teacher / reference) and let it hand out hidden states and its head
    from inside its own forward (`model(..., qtarget_aux=True)`). Returns the model."""
    _check_wrapper(model)
    lm = causal_lm_of(model)
    freeze(model)
    if "_qtarget_aux" not in lm.__dict__:
        lm.__dict__["_qtarget_aux"] = lm.forward
        lm.forward = _bind(_aux_forward, lm)
    return model


def _bind(forward, lm: nn.Module):
    """`forward` bound to `lm`, showing the class forward's signature (generate() validates its kwargs
    against it)."""
    @functools.wraps(type(lm).forward)
    def bound(self, *args, **kwargs):
        return forward(self, *args, **kwargs)

    return types.MethodType(bound, lm)


def _check_aux_vocab(role: str, aux: nn.Module, student_rows: int, tokenizer) -> None:
    rows = head_rows(aux)
    if rows == student_rows:
        return
    if tokenizer is None:
        raise ValueError(f"the {role} model's LM head has {rows} rows but the student's has {student_rows}: pass the "
                         f"tokenizer both share (tokenizer=) to use the common rows, or use a {role} with the "
                         f"student's vocabulary")
    if len(tokenizer) > min(rows, student_rows):
        raise ValueError(f"the {role} model's LM head has {rows} rows and the student's {student_rows}, but the "
                         f"tokenizer has {len(tokenizer)} tokens: the heads do not cover the shared vocabulary")


def patch(model: nn.Module, objective: str | Objective, *, teacher: nn.Module | str | None = None,
          ref: nn.Module | None = None, tokenizer=None, teacher_tail: str = "student",
          chunk_size: int | None = None, memory_budget: int | None = None, mode: str = "auto",
          **objective_params: Any) -> nn.Module:
    """Make `model`'s forward return the fused loss of `objective` (see the module docstring).

    model: a transformers causal LM, possibly inside PEFT / DDP / FSDP wrappers (patch before or after
      wrapping; the head is looked up on every call). Returns the same object. Or a built
      `transformers.Trainer` / TRL `SFTTrainer`: its `trainer.model` is patched (after TRL's own fused-head
      wrapper, which SFTTrainer installs in __init__ and which would otherwise bypass this one), its
      settings are checked (loss_type 'nll', no compute_loss_func, no label smoothing, no PSFT) and aux
      models are moved to its device.
    teacher: a teacher model (frozen here), or "batch" when the batches carry a cached sparse teacher
      (`qtarget teacher-cache`). ref: a reference / base model; default for objectives that need one:
      the PEFT student with adapters disabled, or else a frozen copy of `model` as it is now.
    tokenizer: the tokenizer the student and its aux models share; needed only when their LM heads are
      padded to different row counts (the rows past the tokenizer are padding: aux logits are put on
      the student's rows, missing rows get probability 0).
    chunk_size / memory_budget / mode: the fused engine's settings. objective_params: the objective's
    parameters when `objective` is a name.
    """
    if isinstance(model, Trainer):
        return _patch_trainer(model, objective, teacher=teacher, ref=ref, tokenizer=tokenizer,
                              teacher_tail=teacher_tail, chunk_size=chunk_size, memory_budget=memory_budget,
                              mode=mode, **objective_params)
    _check_wrapper(model)
    objective = get_objective(objective, **objective_params)
    lm = causal_lm_of(model)
    if not hasattr(lm, "get_decoder") or not hasattr(lm, "get_output_embeddings"):
        raise ValueError(f"{type(lm).__name__} is not a causal LM with get_decoder() and get_output_embeddings()")
    check_tail(teacher_tail)
    rows = head_rows(lm)
    needs = objective.needs
    from_batch = isinstance(teacher, str)
    if from_batch and teacher != TEACHER_FROM_BATCH:
        raise ValueError(f"teacher must be a model or {TEACHER_FROM_BATCH!r} (a cached teacher in the batches), "
                         f"got {teacher!r}")
    if "teacher" in needs and teacher is None:
        raise ValueError(f"objective {objective.name!r} needs a teacher: pass teacher= (a model, or "
                         f"{TEACHER_FROM_BATCH!r} for a teacher cache)")
    teacher_model = None
    if "teacher" in needs and not from_batch:
        _check_aux_vocab("teacher", teacher, rows, tokenizer)
        teacher_model = patch_aux(teacher)
    ref_model, ref_from_adapters = None, False
    if "ref" in needs:
        if ref is not None:
            _check_aux_vocab("reference", ref, rows, tokenizer)
            ref_model = patch_aux(ref)
        elif adapter_layers(lm):
            ref_from_adapters = True
        else:
            ref_model = patch_aux(copy.deepcopy(unwrap_module(model)))  # the frozen initial model
    existing = lm.__dict__.get("_qtarget")
    original = existing.original_forward if existing is not None else lm.forward
    if existing is not None:
        _remove_hooks(existing)
    bound = _bind(_fused_forward, lm)
    lm.__dict__["_qtarget"] = PatchState(
        objective=objective, teacher=teacher_model, teacher_tail=teacher_tail,
        ref=ref_model, ref_from_adapters=ref_from_adapters, vocab_size=rows,
        engine={"chunk_size": chunk_size, "memory_budget": memory_budget, "mode": mode}, original_forward=original,
        bound_forward=bound, hooks=_register_hooks(model, lm))
    lm.forward = bound
    lm.accepts_loss_kwargs = True  # transformers' Trainer then passes num_items_in_batch
    return model


def _patch_trainer(trainer: Trainer, objective: str | Objective, *, teacher=None, ref=None, tokenizer=None,
                   **kwargs: Any) -> Trainer:
    """`patch(trainer, ...)`: patch `trainer.model` after the trainer is built (TRL's SFTTrainer wraps the
    model's forward with its own fused head in __init__; patched earlier, that wrapper would bypass ours)
    and refuse trainer settings that would not use the patched loss as it is. Returns the trainer."""
    name = type(trainer).__name__
    objective = get_objective(objective, **{k: kwargs.pop(k) for k in list(kwargs)
                                            if k not in ("teacher_tail", "chunk_size", "memory_budget", "mode")})
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise ValueError(f"{name} has compute_loss_func set: it computes its loss from the full logits, not from "
                         f"the patched forward; drop compute_loss_func to use qtarget.patch")
    if getattr(trainer, "label_smoother", None) is not None:
        raise ValueError(f"{name} has label_smoothing_factor > 0: label smoothing needs the full logits; set it to 0 "
                         f"(qtarget's objectives define the target instead)")
    loss_type = getattr(trainer.args, "loss_type", None)
    if loss_type not in (None, "nll"):
        raise ValueError(f"{name} has loss_type={loss_type!r}, which reweights the per-token loss of the patched "
                         f"forward; set loss_type='nll' and choose the objective in qtarget.patch (e.g. 'dft')")
    if "old_logprobs" in objective.needs:
        raise ValueError(f"objective {objective.name!r} needs log pi_old of the labels on its own schedule, which "
                         f"{name} does not compute; use qtarget.training.QTargetTrainer")
    if tokenizer is None and hasattr(getattr(trainer, "processing_class", None), "__len__"):
        tokenizer = trainer.processing_class
    patch(trainer.model, objective, teacher=teacher, ref=ref, tokenizer=tokenizer, **kwargs)
    state = patched_state(trainer.model)
    for aux in (state.teacher, state.ref):
        if aux is not None and getattr(aux, "hf_device_map", None) is None:
            aux.to(trainer.args.device)
    return trainer


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original forward."""
    lm = causal_lm_of(model)
    state = lm.__dict__.pop("_qtarget", None)
    if state is not None:
        lm.forward = state.original_forward
        _remove_hooks(state)
    return model


def _remove_hooks(state: PatchState) -> None:
    for handle in state.hooks:
        handle.remove()
    state.hooks = ()


def patched_state(model: nn.Module) -> PatchState | None:
    return causal_lm_of(model).__dict__.get("_qtarget")
