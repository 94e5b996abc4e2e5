"""Run in the LLaMA-Factory venv (scripts/setup_llamafactory.sh) by tests/test_integration_llamafactory.py;
not a test module itself.

`python tests/test_integration_llamafactory_driver.py patch` prints, for every registered objective that
needs no per-token batch input, the patched model's loss and gradient against `token_loss` on its full logits
(transformers of this venv: 5.6).

`python tests/test_integration_llamafactory_driver.py WORK` runs, in one process, LLaMA-Factory training
runs on the config WORK/lf.yaml: `qtarget.integrations.llamafactory` with dft and with target_sft (teacher
WORK/teacher), and LLaMA-Factory's own `use_dft_loss` run without qtarget; dft both ways again with LoRA. It writes WORK/lf_results.json:
per run, the logged per-step losses and the output folder (where LLaMA-Factory saved the trained model).
"""
from __future__ import annotations

import json
import os
import sys


def log_losses(output_dir: str) -> list[float]:
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    return [row["loss"] for row in history if "loss" in row]


def main(work: str) -> None:
    from omegaconf import OmegaConf
    from llamafactory.train.tuner import run_exp

    from qtarget.integrations import llamafactory as launcher

    base = OmegaConf.to_container(OmegaConf.load(os.path.join(work, "lf.yaml")))
    results = {}
    # LoRA starts at the model itself (B = 0): a larger step so that 3 steps move the loss
    lora = {"finetuning_type": "lora", "lora_rank": 4, "lora_target": "all", "learning_rate": 20.0}
    runs = {
        "qtarget_dft": (["--objective", "dft"], {}),
        "qtarget_target_sft": (["--objective", "target_sft", "--objective_args", "eta=0.5",
                                "--teacher", os.path.join(work, "teacher")], {}),
        "llamafactory_use_dft_loss": (None, {"use_dft_loss": True}),
        "qtarget_dft_lora": (["--objective", "dft"], lora),
        "llamafactory_use_dft_loss_lora": (None, {"use_dft_loss": True, **lora}),
    }
    for name, (flags, extra) in runs.items():
        out = os.path.join(work, "lf_" + name)
        overrides = [f"output_dir={out}"] + [f"{k}={v}" for k, v in extra.items()]
        if flags is None:  # LLaMA-Factory alone, its own DFT loss
            args = {**base, **extra, "output_dir": out}
            run_exp(args=args)
            patched = None
        else:
            lf_args, settings = launcher.parse_command_line([os.path.join(work, "lf.yaml"), *flags, *overrides])
            callback = launcher.run(lf_args, settings)
            patched = type(callback.patched).__name__
        results[name] = {"losses": log_losses(out), "output_dir": out, "patched": patched}
    import transformers
    import llamafactory

    results["versions"] = {"transformers": transformers.__version__, "llamafactory": llamafactory.__version__}
    with open(os.path.join(work, "lf_results.json"), "w") as f:
        json.dump(results, f)


def patch_check() -> dict:
    import torch
    import transformers

    from qtarget.models.tiny import tiny_causal_lm
    from qtarget.objectives import get_objective, list_objectives, token_loss
    from qtarget.training.patch import patch

    V = 64
    ids = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    teacher = tiny_causal_lm(V, hidden_size=16, num_layers=1, num_heads=2, seed=1)
    out = {"transformers": transformers.__version__, "objectives": {}}
    for name in list_objectives():
        obj = get_objective(name)
        if obj.needs & {"old_logprobs", "token_weights"}:
            continue
        model = tiny_causal_lm(V, hidden_size=16, num_layers=1, num_heads=2, seed=0)
        logits = model(input_ids=ids).logits
        aux = {}
        if "teacher" in obj.needs:
            aux["teacher_logits"] = teacher(input_ids=ids).logits.detach()[:, :-1]
        if "ref" in obj.needs:  # patch's default reference: a frozen copy of the model as it is now
            aux["ref_logits"] = logits.detach()[:, :-1]
        want = token_loss(obj, logits[:, :-1], labels[:, 1:], **aux).loss
        want_grad = torch.autograd.grad(want, list(model.parameters()))
        patch(model, obj, teacher=teacher if "teacher" in obj.needs else None)
        got = model(input_ids=ids, labels=labels).loss
        got_grad = torch.autograd.grad(got, list(model.parameters()))
        out["objectives"][name] = {
            "loss": got.item(), "reference": want.item(),
            "grad_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(got_grad, want_grad)),
            "grad_max_abs": max(float(b.abs().max()) for b in want_grad)}
    return out


if __name__ == "__main__":
    if sys.argv[1] == "patch":
        print(json.dumps(patch_check()))
    else:
        main(sys.argv[1])
