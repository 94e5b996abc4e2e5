"""Worker for tests/test_accelerate_launch.py: `qtarget.training.train` (QTargetTrainer) of a tiny Llama with
dft, psft and target_sft, in this order, in one process or under `accelerate launch --config_file
recipes/launch/fsdp2.yaml --num_processes 2` (CPU, gloo).

    python accelerate_worker.py OUT_DIR ROWS_PER_PROCESS

Each objective trains STEPS optimizer steps on the same global batches (ROWS_PER_PROCESS x processes = 4
rows), writes OUT_DIR/<objective>/final/ (the Trainer's own save), and rank 0 writes OUT_DIR/results.json:
per-step loss and gradient norm (the Trainer's logs), and whether the student's parameters were DTensor
shards during training (FSDP2's fully_shard) and their local share of the elements.

One gate is lifted here, nothing else: accelerate only switches a run to FSDP when its processes sit on
accelerators (AcceleratorState turns MULTI_GPU / MULTI_NPU / MULTI_XPU / ... into FSDP, never MULTI_CPU), so
on a CPU the launch yaml alone gives data-parallel CPU processes. `_fsdp_on_cpu` makes that one switch for
MULTI_CPU with the plugin accelerate built from the yaml; accelerate's FSDP2 preparation (fully_shard per
decoder layer and the root), the Trainer, QTargetTrainer's loss and the FULL_STATE_DICT save are the stock
code.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import accelerate.state
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from qtarget.data import prepare_data
from qtarget.training import train
from test_train_support import config, tiny, tokenizer, toy_rows  # tests/ is on PYTHONPATH

GLOBAL_ROWS, STEPS = 4, 3
# SGD, as tests/test_distributed.py: AdamW divides each gradient by its own running RMS, so float rounding
# in a near-zero gradient (summed in another order across processes) can move a weight by up to the learning
# rate. Gradient clipping at the Trainer's default 1.0 stays on (psft's norm is above it).
SETTINGS = {"dft": dict(learning_rate=1000.0), "psft": dict(learning_rate=0.5, psft_updates_per_batch=2),
            "target_sft": dict(learning_rate=30.0, objective_args={"eta": 0.5})}


def _fsdp_on_cpu() -> None:
    original = accelerate.state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    accelerate.state.AcceleratorState.__init__ = init


def held(p) -> tuple[int, int]:
    """(elements this process holds, elements of the whole parameter): an FSDP2 DTensor shard, a ZeRO-3
    partition (ds_tensor, padded to a multiple of the world size) or a whole tensor."""
    if isinstance(p, DTensor):
        return p.to_local().numel(), p.numel()
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.numel(), p.ds_numel
    return p.numel(), p.numel()


class Shards(TrainerCallback):
    """After the first optimizer step (parameters resharded): the student's class (fully_shard makes an
    FSDP<Class>), are its parameters DTensors, and what share of their elements this process holds."""

    def __init__(self):
        self.seen = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.seen is None:
            params = list(model.parameters())
            local, full = map(sum, zip(*(held(p) for p in params)))
            self.seen = {"model_class": type(model).__name__, "dtensor": all(isinstance(p, DTensor) for p in params),
                         "local_share": local / full}


def main(out: Path, rows_per_process: int) -> None:
    _fsdp_on_cpu()
    tok = tokenizer()
    data = prepare_data(toy_rows(GLOBAL_ROWS * STEPS), tok, max_length=48)
    results = {}
    for objective, settings in SETTINGS.items():
        shards = Shards()
        extra = dict(ddp_backend="gloo") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}
        if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":  # DeepSpeed's own CPU accelerator, not use_cpu
            extra["use_cpu"] = False
        cfg = config(out / objective, objective=objective, per_device_train_batch_size=rows_per_process,
                     max_steps=STEPS, logging_steps=1, dataloader_drop_last=True, optim="sgd", **settings, **extra)
        result = train(cfg, model=tiny(), tokenizer=tok, train_dataset=data.train, callbacks=[shards],
                       teacher=tiny(seed=3) if objective == "target_sft" else None)
        steps = [h for h in result.history if "loss" in h and "step" in h]
        results[objective] = {"loss": [h["loss"] for h in steps], "grad_norm": [h["grad_norm"] for h in steps],
                              **shards.seen}
    if int(os.environ.get("RANK", "0")) == 0:
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results))
        os.replace(tmp, out / "results.json")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
