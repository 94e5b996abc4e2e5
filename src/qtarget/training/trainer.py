"""`QTargetTrainer`: a `transformers.Trainer` whose loss is a q-target objective computed by the
fused engine inside the model's own forward (`qtarget.training.patch`): the same path TRL, HF
Trainer and plain loops use, and the one sharding engines (FSDP, ZeRO-3) see.

Normalisation (SPEC §4). For one optimizer step the Trainer hands `compute_loss` every micro-batch
with `num_items_in_batch` = N, the supervised (shifted) tokens of all micro-batches of the step,
summed over data-parallel ranks (`_get_num_items_in_batch` is overridden to always count). Each
micro-batch returns sum(per-token loss) / N, times the world size because DDP averages gradients
over ranks; the Trainer neither divides by the accumulation steps (`loss_is_scaled_for_ga = True`)
nor rescales further. The accumulated gradient is then the gradient of the global-batch token mean.

PSFT (SPEC §3). With `objective=psft`, `get_batch_samples` pre-fetches the micro-batches of
`psft_updates_per_batch` (M) optimizer steps, computes log pi_old(y) for all of them with the current
model (no gradient, eval mode) and then serves them one optimizer step at a time: M optimizer steps
on M mini-batches share one pi_old, refreshed at every global step that is a multiple of M. A global
batch that crosses an epoch boundary keeps its pi_old: the next epoch's first mini-batches are scored
by a CPU snapshot of the trainable weights taken at the refresh.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from qtarget.data import Collator
from qtarget.training.config import QTargetConfig
from qtarget.training.patch import EXTRA_KEYS, SFT, TEACHER_FROM_BATCH, patch, patched_state
from qtarget.training.run_dir import write_fingerprint

STAGING_DIR = ".qtarget-staging"
METRIC_KEYS = ("nll", "p_y", "entropy", "gamma", "top1", "clip_frac", "ratio", "kl_ref", "kl_teacher")
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


class NonFiniteStop(ValueError):
    """Training met a non-finite loss or gradient: the run stops before that step's optimizer update
    (one line through `qtarget.cli`, exit 2; checkpoints already written stay as they are)."""


def _local(param: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter (the local shard of an FSDP2 DTensor; the tensor itself otherwise)."""
    return param.to_local() if hasattr(param, "to_local") else param


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in MODEL_INPUT_KEYS if batch.get(k) is not None}


class QTargetTrainer(Trainer):
    """Trainer for any qtarget objective. Extra arguments: `teacher`, `ref` (frozen auxiliary models;
    for PEFT students `ref=None` with an objective that needs one means 'the student with its
    adapters disabled')."""

    loss_is_scaled_for_ga = True

    def __init__(self, model: nn.Module, args: QTargetConfig, *, teacher: nn.Module | None = None,
                 ref: nn.Module | None = None, data_collator=None, processing_class=None, **kwargs: Any) -> None:
        if not isinstance(args, QTargetConfig):
            raise ValueError(f"args must be a QTargetConfig, got {type(args).__name__}")
        if data_collator is None:
            if processing_class is None or getattr(processing_class, "pad_token_id", None) is None:
                raise ValueError("pass data_collator or a tokenizer (processing_class) with a pad token")
            data_collator = Collator(processing_class.pad_token_id)
        self.objective = args.build_objective()
        needs = self.objective.needs
        self.is_psft = "old_logprobs" in needs
        teacher_cache = getattr(args, "teacher_cache", None)
        if "teacher" in needs and teacher is None and not teacher_cache:
            raise ValueError(f"objective {args.objective!r} needs a teacher model (--teacher_model) or a teacher "
                             f"cache (--teacher_cache)")
        super().__init__(model=model, args=args, data_collator=data_collator, processing_class=processing_class,
                         **kwargs)
        # One path: the model's own forward returns the fused loss (qtarget.patch); aux models ride along.
        patch(self.model, self.objective, teacher=(TEACHER_FROM_BATCH if teacher_cache else teacher)
              if "teacher" in needs else None, ref=ref if "ref" in needs else None, tokenizer=processing_class,
              teacher_tail=getattr(args, "teacher_tail", "student"), chunk_size=args.chunk_size)
        state = patched_state(self.model)
        for aux in (state.teacher, state.ref):
            if aux is not None and getattr(aux, "hf_device_map", None) is None:
                aux.to(self.args.device)
        self.teacher, self.ref = state.teacher, state.ref
        self.use_adapter_ref = state.ref_from_adapters  # the reference is the student with adapters disabled
        if self.is_psft and args.psft_updates_per_batch == 1:
            warnings.warn("psft with psft_updates_per_batch=1: the ratio is 1 at every step, so PSFT is then "
                          "exactly SFT; use M > 1 (the paper uses 8)", stacklevel=2)
        self._sums = {"train": {}, "eval": {}}
        self._tokens_seen_since_log = 0
        self._last_log_time = None
        self._psft_queue: list[list[dict]] = []
        self._psft_iter = None
        self.psft_refreshes = 0  # how many times pi_old was recomputed (one per PSFT global batch)
        self.psft_refresh_steps: list[int] = []  # the optimizer step (1-based) at which each pi_old took effect
        self.run_fingerprint: dict | None = None  # settings + data of this run (run_dir.py), saved in checkpoints
        self._psft_owed = 0  # optimizer steps of the current global batch still to come from the next epoch
        self._psft_snapshot: dict[str, torch.Tensor] | None = None  # pi_old's trainable weights, for those steps

    # ---- loss -------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        extra = {k: inputs[k] for k in EXTRA_KEYS if inputs.get(k) is not None}
        objective = None
        if self.is_psft:
            if training and "old_logprobs" not in extra:
                # a batch that did not pass through the PSFT schedule: pi_old = current model
                extra["old_logprobs"] = self._label_logprobs(inputs)
            elif not training:
                # pi_old = the current model makes PSFT's surrogate -1 at every token; report the NLL
                objective = SFT
        normalizer = num_items_in_batch if training else None
        outputs = model(**model_inputs(inputs), labels=inputs["labels"], num_items_in_batch=normalizer,
                        qtarget_objective=objective, **extra)
        loss = outputs.loss
        if normalizer is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients across ranks
        self._accumulate("train" if training else "eval", outputs.metrics, inputs)
        return (loss, outputs) if return_outputs else loss

    def _accumulate(self, split: str, metrics: dict[str, float], inputs: dict) -> None:
        n = float(metrics.get("n_tokens", 0.0))
        sums = self._sums[split]
        for key, value in metrics.items():
            if key == "n_tokens":
                continue
            sums[key] = sums.get(key, 0.0) + float(value) * n
        sums["__tokens__"] = sums.get("__tokens__", 0.0) + n
        if split == "train":
            mask = inputs.get("attention_mask")
            self._tokens_seen_since_log += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Supervised (shifted) tokens of all micro-batches of this optimizer step, over all ranks."""
        if not batch_samples:
            return None
        count = sum(b["labels"][..., 1:].ne(-100).sum() for b in batch_samples)
        count = torch.as_tensor(count, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return count

    # ---- non-finite values ------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except ValueError as e:  # the fused engine refuses non-finite inputs (hidden states, weights, logits)
            if "NaN or" not in str(e) or isinstance(e, NonFiniteStop):
                raise
            what = str(e).split(" (pass check_finite", 1)[0].replace("`hidden`", "the model's last hidden states")
            raise NonFiniteStop(self._stop_message(what, inputs)) from None
        # one process: stop on the micro-batch's loss (ranks would disagree; with several, the gradient
        # norm below, reduced over ranks, stops every rank at the same step)
        if self.args.world_size == 1 and not bool(torch.isfinite(loss)):
            raise NonFiniteStop(self._stop_message(f"the training loss is {float(loss)}", inputs))
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm, dtype=torch.float64)):
            raise NonFiniteStop(self._stop_message(f"the gradient norm is {float(grad_norm)} (a finite loss with "
                                                   f"non-finite gradients)", None))
        return grad_norm

    def _stop_message(self, what: str, inputs: dict | None) -> str:
        """One line: the step, what was non-finite, where it came from, and what is kept."""
        step = self.state.global_step + 1
        source = ""
        weights = inputs.get("token_weights") if inputs else None
        if weights is not None and not bool(torch.isfinite(weights).all()):
            source = "; the batch's token_weights column holds non-finite values"
        elif any(not bool(torch.isfinite(_local(p)).all()) for p in self.model.parameters()):
            source = "; the model's weights already hold non-finite values"
        elif inputs is not None and what.startswith("the training loss"):
            source = f"; inputs and weights are finite, so the objective {self.args.objective!r} produced it"
        out = Path(self.args.output_dir)
        kept = sorted((p for p in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()),
                      key=lambda p: int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit() else -1)
        resume = (f"{kept[-1].name} is the last good checkpoint (--resume continues from it)" if kept
                  else "no checkpoint was saved before it")
        return (f"non-finite value at step {step}: {what}{source}; stopped before the optimizer update, {resume}; "
                f"try a lower --learning_rate, --max_grad_norm 1.0, or float32 (--dtype float32)")

    # ---- PSFT schedule ----------------------------------------------------------------------
    @torch.no_grad()
    def _label_logprobs(self, batch: dict) -> torch.Tensor:
        """[B, T] log p(labels[t]) under the current model, aligned with labels (0 at t = 0 and where
        labels are ignored). No gradient; dropout off; through the engine's wrapper (FSDP gathers)."""
        model = self.model_wrapped
        was_training = model.training
        model.eval()
        try:
            out = model(**model_inputs(batch), labels=batch["labels"], qtarget_label_logprobs=True)
        finally:
            model.train(was_training)
        return out.label_logprobs

    def get_batch_samples(self, epoch_iterator, num_batches, device=None):
        if not self.is_psft:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        if epoch_iterator is not self._psft_iter:
            self._psft_iter, self._psft_queue = epoch_iterator, []
        if not self._psft_queue:
            if self._psft_owed:  # a global batch that began in the previous epoch goes on in this one
                self._serve_rest_of_global_batch(epoch_iterator, num_batches)
            else:
                self._refresh_old_policy(epoch_iterator, num_batches)
        batch_samples = self._psft_queue.pop(0) if self._psft_queue else []
        return batch_samples, self._get_num_items_in_batch(batch_samples, device)

    def _fetch_groups(self, epoch_iterator, num_batches: int, count: int) -> list[list[dict]]:
        """Up to `count` optimizer steps' worth of micro-batches (fewer when the epoch ends)."""
        groups = []
        for _ in range(count):
            group = []
            for _ in range(num_batches):
                try:
                    group.append(next(epoch_iterator))
                except StopIteration:
                    break
            if not group:
                break
            groups.append(group)
        return groups

    def _attach_old_logprobs(self, groups: list[list[dict]]) -> None:
        for group in groups:
            for b in group:
                b["old_logprobs"] = self._label_logprobs(self._prepare_inputs(b)).to(b["labels"].device)

    def _refresh_old_policy(self, epoch_iterator, num_batches: int) -> None:
        """Start a global batch at this step: pi_old = the current model on the mini-batches of the next
        M - (global_step mod M) optimizer steps, so refreshes fall exactly on steps 0, M, 2M, ... If the
        epoch ends first, the rest of the global batch comes from the next epoch's first mini-batches,
        scored by a snapshot of the weights taken now (`_serve_rest_of_global_batch`)."""
        M = int(self.args.psft_updates_per_batch)
        step = self.state.global_step
        left_in_group = M - step % M
        if left_in_group != M and self.psft_refreshes == 0:
            warnings.warn(f"resuming PSFT at step {step}, inside a global batch of {M} "
                          f"mini-batches: pi_old is recomputed now (save checkpoints at multiples of "
                          f"psft_updates_per_batch for an exact resume)", stacklevel=3)
        groups = self._fetch_groups(epoch_iterator, num_batches, left_in_group)
        if not groups:
            return
        self._attach_old_logprobs(groups)
        self._psft_queue = groups
        self.psft_refreshes += 1
        self.psft_refresh_steps.append(step + 1)  # the first optimizer step that uses this pi_old
        owed = left_in_group - len(groups)
        if owed > 0 and step + len(groups) < self.state.max_steps:
            self._psft_owed = owed
            self._psft_snapshot = self._old_policy_snapshot()

    def _serve_rest_of_global_batch(self, epoch_iterator, num_batches: int) -> None:
        groups = self._fetch_groups(epoch_iterator, num_batches, self._psft_owed)
        snapshot, self._psft_snapshot, self._psft_owed = self._psft_snapshot, None, 0
        if not groups:
            return
        if snapshot is None:
            self._attach_old_logprobs(groups)  # no snapshot (sharded weights): the current model stands in
        else:
            with self._weights_swapped(snapshot):
                self._attach_old_logprobs(groups)
        self._psft_queue = groups

    def _old_policy_snapshot(self) -> dict[str, torch.Tensor] | None:
        """A copy of the trainable weights (the only ones that change) on the CPU, to score next epoch's
        first mini-batches with pi_old; None where the weights are partitioned away from the module (ZeRO-3)."""
        trainable = {name: p for name, p in self.model_wrapped.named_parameters() if p.requires_grad}
        if any(hasattr(p, "ds_tensor") for p in trainable.values()):
            warnings.warn("PSFT with ZeRO-3: the mini-batches of a global batch that crosses an epoch boundary are "
                          "scored by the model at the epoch boundary, not by pi_old", stacklevel=3)
            return None
        return {name: _local(p).detach().to("cpu", copy=True) for name, p in trainable.items()}

    @contextlib.contextmanager
    def _weights_swapped(self, snapshot: dict[str, torch.Tensor]):
        params = dict(self.model_wrapped.named_parameters())
        current = {name: _local(params[name]).detach().clone() for name in snapshot}
        try:
            with torch.no_grad():
                for name, value in snapshot.items():
                    _local(params[name]).copy_(value)
            yield
        finally:
            with torch.no_grad():
                for name, value in current.items():
                    _local(params[name]).copy_(value)

    # ---- logging ----------------------------------------------------------------------------
    def _reduced_means(self, split: str) -> dict[str, float]:
        sums = self._sums[split]
        self._sums[split] = {}
        keys = sorted(k for k in sums)
        if self.args.world_size > 1:
            # every rank has the same metric keys (same objective, same inputs)
            vec = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.args.device)
            vec = self.accelerator.reduce(vec, reduction="sum")
            sums = dict(zip(keys, vec.tolist()))
        n = sums.pop("__tokens__", 0.0)
        if n <= 0:
            return {}
        return {k: v / n for k, v in sums.items()}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs = dict(logs)
        is_eval = any(k.startswith("eval_") for k in logs)
        if is_eval:
            logs.update({f"eval_{k}": v for k, v in self._reduced_means("eval").items()})
        elif "loss" in logs:
            logs.update(self._reduced_means("train"))
            now = time.perf_counter()
            tokens = torch.tensor(float(self._tokens_seen_since_log), device=self.args.device)
            if self.args.world_size > 1:
                tokens = self.accelerator.reduce(tokens, reduction="sum")
            if self._last_log_time is not None:
                logs["tokens_per_s"] = float(tokens) / max(now - self._last_log_time, 1e-9)
            self._last_log_time = now
            self._tokens_seen_since_log = 0
            if self.is_psft:
                logs["psft_refreshes"] = float(self.psft_refreshes)
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        self._last_log_time = time.perf_counter()
        return super().train(*args, **kwargs)

    # ---- atomic checkpoints ------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        if getattr(self, "_staging", False):
            return os.path.join(run_dir, STAGING_DIR)
        return run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """Write checkpoint-N into a staging folder, then rename it into place (atomic on POSIX), so a
        crash mid-save never leaves a half-written checkpoint that `--resume` would pick."""

        run_dir = self._get_output_dir(trial)
        staging = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if self.run_fingerprint is not None:
                write_fingerprint(Path(staging) / name, self.run_fingerprint)
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best and STAGING_DIR in best:
                self.state.best_model_checkpoint = best.replace(os.sep + STAGING_DIR, "")
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

