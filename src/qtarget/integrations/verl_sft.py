"""verl's engine SFT trainer with a qtarget objective as its loss: verl's own config and command line,
plus a `qtarget` group.

    torchrun --standalone --nproc_per_node=8 -m qtarget.integrations.verl_sft \\
        <every verl sft_trainer_engine option, as for `-m verl.trainer.sft_trainer`> \\
        +qtarget.objective=dft                     # any objective computable from log p(y)
        +qtarget.alpha=0.5                         # every other qtarget key: a parameter of the objective

This is verl's `verl.trainer.sft_trainer` main (same hydra config, `sft_trainer_engine.yaml`), with one
change: after verl builds its engine and installs its `sft_loss`, the loss is replaced through the same
`set_loss_fn` hook by `qtarget.integrations.verl.VerlLoss`. The objective is checked before verl starts.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import hydra
from omegaconf import OmegaConf
from verl.trainer import sft_trainer
from verl.utils.device import auto_set_device
from verl.utils.distributed import destroy_global_process_group, initialize_global_process_group

from qtarget.integrations.verl import VerlLoss, install

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(sft_trainer.__file__)), "config")


def objective_from_config(config: Any) -> tuple[str, dict]:
    """(objective name, parameters) from the config's `qtarget` group (default: sft, verl's own loss)."""
    group = config.get("qtarget") if hasattr(config, "get") else None
    group = {} if group is None else OmegaConf.to_container(group, resolve=True)
    if not isinstance(group, dict):
        raise ValueError("qtarget must be a group: +qtarget.objective=NAME [+qtarget.PARAM=VALUE ...]")
    params = dict(group)
    name = params.pop("objective", "sft")
    return str(name), params


class QTargetSFTTrainer(sft_trainer.SFTTrainer):
    """verl's SFTTrainer whose loss is the qtarget objective named in the config."""

    def _build_engine(self):
        super()._build_engine()
        name, params = objective_from_config(self.config)
        install(self, name, **params)


def run_sft(config: Any) -> None:
    """verl's run_sft with QTargetSFTTrainer."""
    initialize_global_process_group()
    trainer = QTargetSFTTrainer(config=config)
    trainer.fit()
    destroy_global_process_group()


@hydra.main(config_path=CONFIG_DIR, config_name="sft_trainer_engine", version_base=None)
def main(config: Any) -> None:
    auto_set_device(config)
    try:
        name, params = objective_from_config(config)
        VerlLoss(name, **params)
    except ValueError as e:  # one line, exit 2 (as qtarget's CLI), before verl starts anything
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    run_sft(config)


if __name__ == "__main__":
    main()
