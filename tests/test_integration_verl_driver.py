"""Run in the verl venv (scripts/setup_verl.sh) by tests/test_integration_verl.py; not a test module itself.

`python tests/test_integration_verl_driver.py engine` drives qtarget's VerlLoss through verl's own engine
code on CPU, as verl's CPU engine tests do (an FSDPEngineWithLMHead made with object.__new__, a gloo
process group, the device id patched to "cpu"): SFTTensorCollator -> tu.get_tensordict (the batch verl's
SFTTrainer builds) -> FSDPEngine.forward_backward_batch (batch_num_tokens all-reduced over the data-parallel
group, dp_size, micro-batches) -> forward_step -> prepare_model_inputs / prepare_model_outputs -> the loss.
Two gloo ranks (dp_size 2), two micro-batches each; the ranks' gradients are averaged as FSDP/DDP average
them. It prints one JSON line: for sft, qtarget's loss and gradients against verl's stock sft_loss on the
same path; for dft, against the DFT fork's formula -sum(CE * sg(p_y) * mask) / tokens, computed here from a
plain single-process forward of the whole batch in float64.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
LENGTHS = [(3, 6), (5, 4), (2, 7), (4, 5)]  # (prompt, response) tokens per sequence
VOCAB = 96


def tiny_model():
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    # larger logits than the initialisation's, so p_y varies over tokens and DFT's weight matters
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


def samples():
    g = torch.Generator().manual_seed(1)
    out = []
    for prompt, response in LENGTHS:
        n = prompt + response
        out.append({"input_ids": torch.randint(1, VOCAB, (n,), generator=g),
                    "position_ids": torch.arange(n),
                    "loss_mask": torch.tensor([0] * prompt + [1] * response)})
    return out


def verl_batch(items):
    """The batch as verl's SFTTrainer.fit builds it: collated to nested tensors plus its meta info."""
    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.dataset_utils import SFTTensorCollator

    collated = SFTTensorCollator("no_padding")(items)
    meta = {"use_remove_padding": False, "use_dynamic_bsz": False, "max_token_len_per_gpu": 4096,
            "micro_batch_size_per_gpu": 1, "temperature": 1.0, "global_batch_size": len(LENGTHS),
            "pad_mode": "no_padding", "pad_token_id": 0}
    return tu.get_tensordict(tensor_dict=collated, non_tensor_dict=meta)


def make_engine(model):
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    engine = object.__new__(FSDPEngineWithLMHead)
    engine.module = model
    engine.engine_config = SimpleNamespace(use_no_sync_for_gradient_accumulation=True, entropy_checkpointing=False,
                                           entropy_from_logits_with_chunking=False)
    engine.ulysses_sequence_parallel_size = 1
    engine.use_ulysses_sp = False
    engine.pad_to_length = None
    engine.scaler = None
    engine._autocast_dtype = torch.float32
    engine.get_data_parallel_group = lambda: dist.group.WORLD
    engine.get_data_parallel_size = lambda: dist.get_world_size()
    return engine


def engine_step(engine, data, loss_fn):
    """One forward_backward_batch on this rank; gradients averaged over ranks (as FSDP/DDP do). Returns
    (sum of the micro-batch losses averaged over ranks, flat gradient, batch_num_tokens, micro-batches)."""
    engine.module.zero_grad(set_to_none=True)
    out = engine.forward_backward_batch(data.clone(), loss_function=loss_fn, forward_only=False)
    losses = out["loss"] if isinstance(out, dict) else [o["loss"] for o in out]
    loss = torch.tensor(float(sum(losses)), dtype=torch.float64)
    dist.all_reduce(loss, op=dist.ReduceOp.SUM)
    grads = []
    for p in engine.module.parameters():
        g = p.grad.detach().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        grads.append((g / dist.get_world_size()).reshape(-1))
    return loss.item() / dist.get_world_size(), torch.cat(grads), len(losses)


def dft_fork_reference(items):
    """The DFT fork's per-token loss (CE * sg(p_y), mask aligned to the predicted token) with verl's global
    token mean, from a plain float64 forward of every sequence: (loss, flat gradient)."""
    model = tiny_model().double()
    total, n = 0.0, 0
    for it in items:
        ids = it["input_ids"][None]
        logits = model(input_ids=ids).logits[0, :-1]
        labels, mask = ids[0, 1:], it["loss_mask"][1:].double()
        ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        p_y = torch.softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
        total = total + (ce * p_y.detach() * mask).sum()
        n += int(mask.sum())
    loss = total / n
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return loss.item(), grad, n


def worker(rank, rendezvous, out_path):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        import verl
        from verl.workers.engine.fsdp import transformer_impl
        from verl.workers.utils.losses import sft_loss

        from qtarget.integrations.verl import VerlLoss

        transformer_impl.get_device_id = lambda: "cpu"  # as verl's CPU engine tests patch it
        items = samples()
        mine = items[rank::WORLD]
        data = verl_batch(mine)
        engine = make_engine(tiny_model())
        supervised = sum(int(it["loss_mask"].sum()) for it in items)

        stock_loss, stock_grad, _ = engine_step(engine, data, partial(sft_loss, config=None))
        q_sft_loss, q_sft_grad, n_micro = engine_step(engine, data, VerlLoss("sft"))
        q_dft_loss, q_dft_grad, _ = engine_step(engine, data, VerlLoss("dft"))
        probe = data.clone()
        inferred = engine.forward_backward_batch(probe, loss_function=VerlLoss("sft"), forward_only=True)
        batch_num_tokens = int(probe["batch_num_tokens"])
        # psft with log pi_old = the model's own log-probs (a forward-only pass, as verl's infer_batch) minus
        # 0.2: every ratio is e^0.2 = 1.2214, inside eps = 0.28 (gradient e^0.2 x sft's, loss -e^0.2) and
        # beyond eps = 0.2 (no gradient, loss -1.2)
        old = inferred["model_output"]["log_probs"]
        with_old = data.clone()
        with_old["old_log_probs"] = torch.nested.nested_tensor_from_jagged(old.values() - 0.2, old.offsets())
        psft_in_loss, psft_in_grad, _ = engine_step(engine, with_old, VerlLoss("psft", eps=0.28))
        psft_out_loss, psft_out_grad, _ = engine_step(engine, with_old, VerlLoss("psft", eps=0.2))
        if rank == 0:
            ref_loss, ref_grad, n_ref = dft_fork_reference(items)
            result = {
                "versions": {"verl": verl.__version__, "torch": torch.__version__,
                             "transformers": __import__("transformers").__version__},
                "sft": {"loss": q_sft_loss, "reference_loss": stock_loss,
                        "grad_max_abs_diff": float((q_sft_grad - stock_grad).abs().max()),
                        "grad_max_abs": float(stock_grad.abs().max()),
                        "batch_num_tokens": batch_num_tokens, "supervised_tokens": supervised,
                        "micro_batches": n_micro},
                "dft": {"loss": q_dft_loss, "reference_loss": ref_loss,
                        "grad_max_abs_diff": float((q_dft_grad.double() - ref_grad).abs().max()),
                        "grad_max_abs": float(ref_grad.abs().max()),
                        "batch_num_tokens": batch_num_tokens, "supervised_tokens": n_ref,
                        "micro_batches": n_micro},
                "psft": {"loss_inside": psft_in_loss, "loss_clipped": psft_out_loss,
                         "grad_inside_max_abs_diff": float((psft_in_grad - math.exp(0.2) * stock_grad).abs().max()),
                         "grad_clipped_max_abs": float(psft_out_grad.abs().max())},
                "dp_size": WORLD,
            }
            with open(out_path, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def entry_point():
    """The verl_sft entry point without a GPU: verl's own hydra config composed with +qtarget overrides, and
    QTargetSFTTrainer._build_engine run with verl's TrainingWorker replaced by a recorder (verl's trainer
    initialises NCCL and its engines are registered for cuda/npu only). Returns what was installed."""
    from unittest import mock

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from qtarget.integrations import verl_sft

    with initialize_config_dir(config_dir=verl_sft.CONFIG_DIR, version_base=None):
        config = compose(config_name="sft_trainer_engine",
                         overrides=["+qtarget.objective=prob", "+qtarget.alpha=0.5"])
    installed = {}

    class RecordingWorker:
        def __init__(self, config):
            self.engine = "engine"

        def set_loss_fn(self, loss_fn):
            installed.setdefault("calls", []).append(loss_fn)

    trainer = object.__new__(verl_sft.QTargetSFTTrainer)
    trainer.config = config
    trainer.model_config = trainer.engine_config = trainer.optimizer_config = None
    trainer.checkpoint_config = trainer.profiler_config = None
    with mock.patch("verl.trainer.sft_trainer.TrainingWorker", RecordingWorker), \
            mock.patch("verl.workers.engine_workers.TrainingWorkerConfig", lambda **kw: kw):
        trainer._build_engine()
    calls = installed["calls"]
    return {"objective_from_config": list(verl_sft.objective_from_config(config)),
            "set_loss_fn_calls": [type(c).__name__ if not hasattr(c, "func") else c.func.__name__ for c in calls],
            "final_loss": repr(trainer.loss_fn), "final_is_installed": calls[-1] is trainer.loss_fn,
            "qtarget_group": OmegaConf.to_container(config.qtarget)}


def main(argv):
    if argv[:1] == ["entry"]:
        print(json.dumps(entry_point()))
        return
    if argv[:1] != ["engine"]:
        raise SystemExit("usage: test_integration_verl_driver.py engine|entry")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(worker, args=(os.path.join(tmp, "rdzv"), out), nprocs=WORLD, join=True)
        with open(out) as f:
            print(json.dumps(json.load(f)))


if __name__ == "__main__":
    main(sys.argv[1:])
