"""Worker for tests/test_distributed.py: `torchrun --standalone --nproc_per_node 2 distributed_worker.py
ENGINE OUT.json` trains a patched tiny Llama (`qtarget.patch`, the loss inside the forward) with a
hand-written loop under a sharding engine and, on rank 0, the same loop in one process on the full
batch; it writes per-step losses and the largest final-parameter difference to OUT.json.

ENGINE: ddp | zero3 (DeepSpeed ZeRO-3, CPU accelerator, gloo; client SGD, no clipping) | fsdp2 (root with reshard_after_forward=True; and lm_head in its own unit) |
fsdp1 (use_orig_params True and False). Objectives: dft, psft (M = 2: pi_old of two mini-batches
from the model before the first of their two steps) and target_sft with a teacher (wrapped by the
same engine, except DDP, which refuses a model without trainable parameters).

Each rank gets half of every global batch; the loss is normalised by the global supervised-token
count (num_items_in_batch) and multiplied by the world size because DDP / FSDP average gradients.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor import DTensor
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import qtarget
from qtarget.models import tiny_causal_lm
from qtarget.training.patch import patch_aux

VOCAB, T, B, STEPS, M = 96, 12, 4, 3, 2
LR = {"dft": 20.0, "psft": 0.5, "target_sft": 5.0}  # each moves the weights by well over 1e-3
OBJECTIVES = ("dft", "psft", "target_sft")


def batches() -> list[dict[str, torch.Tensor]]:
    """STEPS global batches of B rows: right padding and masked prompts of varied lengths."""
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.long)
        labels = ids.clone()
        for r in range(B):
            length = int(torch.randint(T // 2, T + 1, (1,), generator=g))
            prompt = int(torch.randint(1, T // 2, (1,), generator=g))
            mask[r, length:] = 0
            labels[r, length:] = -100
            labels[r, :prompt] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def n_items(batch: dict) -> int:
    return int(batch["labels"][:, 1:].ne(-100).sum())


def models(objective: str) -> tuple[nn.Module, nn.Module | None]:
    student = tiny_causal_lm(VOCAB, hidden_size=32, num_layers=2, num_heads=2, seed=0).train()
    teacher = tiny_causal_lm(VOCAB, hidden_size=32, num_layers=2, num_heads=2, seed=1) \
        if objective == "target_sft" else None
    return student, teacher


def objective_args(objective: str) -> dict:
    return {"target_sft": {"eta": 0.5}}.get(objective, {})


def train(model: nn.Module, data: list[dict], objective: str, *, rows: slice, scale: float,
          reduce) -> list[float]:
    """STEPS SGD steps; returns the global loss of every step."""
    deepspeed_engine = hasattr(model, "backward") and hasattr(model, "zero_optimization_stage")
    if deepspeed_engine:
        opt = model  # engine.step() steps its (client) optimizer
    else:
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR[objective])
    old: dict[int, torch.Tensor] = {}
    losses = []
    for step, batch in enumerate(data):
        local = {k: v[rows] for k, v in batch.items()}
        extra = {}
        if objective == "psft":
            if step % M == 0:  # pi_old of the next M mini-batches, from the model before their first step
                model.eval()
                with torch.no_grad():
                    for j in range(step, min(step + M, len(data))):
                        part = {k: v[rows] for k, v in data[j].items()}
                        old[j] = model(**part, qtarget_label_logprobs=True).label_logprobs
                model.train()
            extra["old_logprobs"] = old[step]
        out = model(**local, num_items_in_batch=n_items(batch), **extra)
        if deepspeed_engine:
            model.backward(out.loss * scale)
            model.step()
        else:
            (out.loss * scale).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(reduce(out.loss.detach()))
    return losses


def full_state(model: nn.Module, engine: str) -> dict[str, torch.Tensor]:
    if engine == "zero3":
        import deepspeed  # noqa: PLC0415 (optional heavy library)

        with deepspeed.zero.GatheredParameters(list(model.module.parameters())):
            return {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    if engine == "ddp":
        return {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def sharded(model: nn.Module, engine: str) -> bool:
    """Whether the engine really shards the LM head's parameters across the ranks (outside a forward)."""
    if engine == "ddp":
        return False
    if engine == "zero3":  # partitioned parameters are empty outside the forward
        return all(p.numel() == 0 for p in model.parameters()) and hasattr(model.module.lm_head.weight, "ds_id")
    if engine == "fsdp2":
        weight = model.lm_head.weight
        return isinstance(weight, DTensor) and weight.to_local().shape[0] < weight.shape[0]
    total = VOCAB * 32 * 2 + VOCAB * 32  # embeddings + head: larger than any rank's share
    return all(p.numel() < total for p in model.parameters())  # FSDP1: flat shards (or sharded views)


def wrap(model: nn.Module, engine: str, variant: str, *, trainable: bool, lr: float = 0.0) -> nn.Module:
    if engine == "zero3":  # DeepSpeed, lazily: an optional heavy library
        import deepspeed  # noqa: PLC0415 (optional heavy library)

        config = {"train_micro_batch_size_per_gpu": B // dist.get_world_size(), "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "steps_per_print": 10**9, "wall_clock_breakdown": False,
                  "zero_allow_untested_optimizer": True,
                  "gradient_clipping": 0.0}  # DeepSpeed clips at 1.0 by default; the reference does not
        optimizer = torch.optim.SGD(model.parameters(), lr=lr) if trainable else None
        engine_, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return engine_
    if engine == "ddp":
        return nn.parallel.DistributedDataParallel(model) if trainable else model
    if engine == "fsdp2":
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        if variant == "head_unit":
            fully_shard(model.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh, reshard_after_forward=True)
        return model
    if engine == "fsdp1":
        return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), device_id=torch.device("cpu"),
                    use_orig_params=(variant == "orig_params"))
    raise ValueError(f"unknown engine {engine!r}")


VARIANTS = {"zero3": ("stage3",), "ddp": ("plain",), "fsdp2": ("root_reshard", "head_unit"),
            "fsdp1": ("orig_params", "flat_params")}


def main() -> None:
    engine, out_path = sys.argv[1], sys.argv[2]
    if engine == "zero3":
        import deepspeed  # noqa: PLC0415 (optional heavy library)

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # a stalled pair fails, not hangs
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    data = batches()
    per_rank = B // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)

    def all_sum(x: torch.Tensor) -> float:
        x = x.clone()
        dist.all_reduce(x)
        return float(x)

    results = {}
    for variant in VARIANTS[engine]:
        for objective in OBJECTIVES:
            key = f"{engine}/{variant}/{objective}"
            try:
                # one process, full batch, no wrapper: the reference
                ref_model, ref_teacher = models(objective)
                qtarget.patch(ref_model, objective, teacher=ref_teacher, **objective_args(objective))
                initial = {k: v.detach().clone() for k, v in ref_model.state_dict().items()}
                ref_losses = train(ref_model, data, objective, rows=slice(None), scale=1.0, reduce=float)
                reference = ref_model.state_dict()

                student, teacher = models(objective)
                if teacher is not None:
                    patch_aux(teacher)
                    teacher = wrap(teacher, engine, variant, trainable=False)
                qtarget.patch(student, objective, teacher=teacher, **objective_args(objective))
                model = wrap(student, engine, variant, trainable=True, lr=LR[objective])
                losses = train(model, data, objective, rows=mine, scale=float(world), reduce=all_sum)
                final = full_state(model, engine)
                if rank == 0:
                    assert final.keys() == reference.keys(), (sorted(final)[:4], sorted(reference)[:4])
                    results[key] = {
                        "sharded": sharded(model, engine),
                        "teacher_sharded": teacher is not None and sharded(teacher, engine),
                        "losses": losses, "ref_losses": ref_losses,
                        "param_diff": max(float((final[k] - reference[k]).abs().max()) for k in final),
                        "moved": max(float((reference[k] - initial[k]).abs().max()) for k in reference),
                    }
            except Exception as exc:  # recorded, so one failing case does not hide the others
                results[key] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
            dist.barrier()
    if rank == 0:  # written whole or not at all: the test reads a result only from a finished run
        partial = out_path + ".partial"
        with open(partial, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(partial, out_path)
    dist.barrier()
    dist.destroy_process_group()
    # skip the interpreter's teardown: gloo's background threads can abort it ("terminate called without
    # an active exception", SIGABRT) after all the work is done
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
