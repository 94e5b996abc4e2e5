"""qtarget objectives inside LLaMA-Factory's own training run (qtarget.integrations.llamafactory).

The first part runs everywhere: the launcher's command line and its refusals (no LLaMA-Factory needed).
The second part (marker `llamafactory`) runs only when the venv of scripts/setup_llamafactory.sh exists
($QTARGET_LLAMAFACTORY_VENV, default /tmp/qtarget-llamafactory): a tiny random model trained 3 steps
through the launcher with dft and target_sft, in that venv (transformers 5.6), against `qtarget train`
(`qtarget.training.train`, this venv) on the same rows, and dft against LLaMA-Factory's own use_dft_loss.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qtarget.integrations import llamafactory as launcher
from qtarget.objectives import get_objective

ROOT = Path(__file__).resolve().parents[1]
LF_VENV = Path(os.environ.get("QTARGET_LLAMAFACTORY_VENV", "/tmp/qtarget-llamafactory"))
LF_PYTHON = LF_VENV / "bin" / "python"


def write_yaml(path: Path, **keys) -> Path:
    path.write_text(yaml.safe_dump({"stage": "sft", "model_name_or_path": "m", **keys}))
    return path


def test_command_line_splits_qtarget_settings_from_llamafactory_args(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", learning_rate=1e-4, qtarget_objective="prob",
                     qtarget_objective_args={"alpha": 0.5})
    lf_args, settings = launcher.parse_command_line([str(cfg), "max_steps=7", "--teacher_dtype", "float32"])
    assert lf_args == {"stage": "sft", "model_name_or_path": "m", "learning_rate": 1e-4, "max_steps": 7}
    assert settings == {"objective": "prob", "objective_args": {"alpha": 0.5}, "teacher": None,
                        "teacher_dtype": "float32"}
    # flags win over the YAML's qtarget keys
    _, settings = launcher.parse_command_line([str(cfg), "--objective", "dft", "--objective_args", "tau=0.2"])
    assert settings["objective"] == "dft" and launcher.parse_objective_args(settings["objective_args"]) == {"tau": 0.2}
    callback = launcher.prepare(*launcher.parse_command_line([str(cfg)]))
    assert callback.objective.name == "prob" and callback.objective.params == {"alpha": 0.5}


@pytest.mark.parametrize("keys,flags,error", [
    ({"use_dft_loss": True}, ["--objective", "dft"], "use_dft_loss: LLaMA-Factory's own loss"),
    ({"stage": "dpo"}, [], "stage: 'dpo' is not supported"),
    ({"label_smoothing_factor": 0.1}, [], "label_smoothing_factor"),
    ({}, ["--objective", "psft"], "psft: it needs log pi_old"),
    ({}, ["--objective", "token_weighted"], "token_weighted: it needs per-token weights"),
    ({}, ["--objective", "target_sft"], "needs a teacher: pass --teacher"),
    ({}, ["--objective", "dft", "--teacher", "t"], "--teacher: objective 'dft' reads no teacher"),
    ({}, ["--objective", "kd", "--teacher", "/nonexistent/teacher"], "no model folder at /nonexistent/teacher"),
    ({}, ["--objective", "dtf"], "unknown objective 'dtf'"),
    ({}, ["--objective", "prob", "--objective_args", "alpha"], "--objective_args: cannot read 'alpha'"),
])
def test_bad_settings_are_refused_before_llamafactory_runs(tmp_path, keys, flags, error):
    cfg = write_yaml(tmp_path / "c.yaml", **keys)
    with pytest.raises((ValueError, OSError), match=error):
        launcher.prepare(*launcher.parse_command_line([str(cfg), *flags]))


def test_main_prints_one_line_and_exits_2(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "c.yaml", use_eaft_loss=True)
    assert launcher.main([str(cfg), "--objective", "dft"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: use_eaft_loss")
    assert launcher.main([str(tmp_path / "missing.yaml")]) == 2
    assert "no file at" in capsys.readouterr().err


def test_callback_patches_the_model_it_is_given():
    from qtarget.models import tiny_causal_lm
    from qtarget.training.patch import patched_state

    model = tiny_causal_lm(64, hidden_size=16, num_layers=1, num_heads=2)
    callback = launcher.QTargetCallback(get_objective("dft"))
    callback.on_init_end(None, None, "control", model=model)
    assert patched_state(model).objective.name == "dft" and callback.patched is model
    ids = torch.randint(0, 64, (2, 9))
    out = model(input_ids=ids, labels=ids)
    logits = model.get_output_embeddings()(model.get_decoder()(input_ids=ids).last_hidden_state)[:, :-1].double()
    logp_y = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert out.loss.item() == pytest.approx((-(logp_y.exp() * logp_y)).mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------- LF venv
lf_venv = pytest.mark.skipif(not any(LF_VENV.glob(".qtarget-llamafactory-*")),
                             reason=f"no LLaMA-Factory venv at {LF_VENV} (scripts/setup_llamafactory.sh builds it)")
STEPS, LR = 3, 1.0


def rows(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    words = ["alpha", "beta", "gamma", "delta", "one", "two", "three", "sum", "is", "the"]
    out = []
    for i in range(n):
        k = int(torch.randint(2, 7, (1,), generator=g))
        resp = " ".join(words[int(j)] for j in torch.randint(0, len(words), (k,), generator=g))
        out.append({"prompt": f"Q{i}: add {i} and {i % 5}.", "response": f" {resp} {i + i % 5}."})
    return out


def warm_up(model, tok, data, seed: int, steps: int = 40) -> None:
    """A few plain next-token steps on the rows, so p(y) is far from 1/V and DFT's weight matters (a random
    model's p(y) ~ 2e-5 leaves DFT's gradient ~0)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.tensor(tok(r["prompt"] + r["response"])["input_ids"] + [tok.eos_token_id]) for r in data]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        ids = seqs[int(torch.randint(0, len(seqs), (1,), generator=g))][None]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def lf_runs(tmp_path_factory):
    """The tiny student and teacher, the rows in both formats, LLaMA-Factory's three runs (in its venv)."""
    from qtarget.models import load_tokenizer, tiny_causal_lm

    work = tmp_path_factory.mktemp("lf")
    tok = load_tokenizer("gpt2")
    data = rows()
    for name, seed in (("student", 0), ("teacher", 1)):
        model = tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, seed=seed)
        warm_up(model, tok, data, seed)
        model.save_pretrained(work / name)
        tok.save_pretrained(work / name)
    with open(work / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in data)
    # LLaMA-Factory's Alpaca rows with the "empty" template: prompt, then the response; `qtarget train`
    # appends eos to the response, so the LLaMA-Factory rows end with eos's text (a special token)
    (work / "toy.json").write_text(json.dumps([{"instruction": r["prompt"], "input": "",
                                                "output": r["response"] + tok.eos_token} for r in data]))
    (work / "dataset_info.json").write_text(json.dumps({"toy": {"file_name": "toy.json"}}))
    (work / "lf.yaml").write_text(yaml.safe_dump({
        "model_name_or_path": str(work / "student"), "stage": "sft", "do_train": True, "finetuning_type": "full",
        "dataset": "toy", "dataset_dir": str(work), "template": "empty", "cutoff_len": 256,
        "per_device_train_batch_size": len(data), "gradient_accumulation_steps": 1, "max_steps": STEPS,
        "learning_rate": LR, "optim": "sgd", "lr_scheduler_type": "constant", "warmup_steps": 0,
        "weight_decay": 0.0, "max_grad_norm": 1.0, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "use_cpu": True, "seed": 0, "overwrite_output_dir": True, "disable_gradient_checkpointing": True,
        "dataloader_num_workers": 0, "plot_loss": False}))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DISABLE_VERSION_CHECK": "1"}
    proc = subprocess.run([str(LF_PYTHON), str(ROOT / "tests" / "test_integration_llamafactory_driver.py"), str(work)],
                          capture_output=True, text=True, timeout=1200, env=env, cwd=str(work))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    return work, json.loads((work / "lf_results.json").read_text())


def qtarget_train(work: Path, objective: str, **kw):
    from qtarget.training import QTargetConfig, train

    cfg = QTargetConfig(output_dir=str(work / f"qt_{objective}"), model=str(work / "student"), objective=objective,
                        use_cpu=True, disable_tqdm=True, report_to="none", per_device_train_batch_size=8,
                        max_steps=STEPS, learning_rate=LR, optim="sgd", lr_scheduler_type="constant",
                        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, save_strategy="no", max_length=256,
                        seed=0, plot=False, **kw)
    result = train(cfg, train_dataset=str(work / "rows.jsonl"))
    return [row["loss"] for row in result.history if "loss" in row], work / f"qt_{objective}" / "final"


def max_weight_diff(a: Path, b: Path, name: str = "model.safetensors") -> float:
    wa, wb = load_file(str(a / name)), load_file(str(b / name))
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


@pytest.mark.llamafactory
@lf_venv
@pytest.mark.parametrize("objective,run,kw", [
    ("dft", "qtarget_dft", {}),
    ("target_sft", "qtarget_target_sft", {"objective_args": {"eta": 0.5}}),
])
def test_launcher_run_equals_qtarget_train(lf_runs, objective, run, kw):
    work, results = lf_runs
    assert results["versions"]["llamafactory"] == "0.9.5"
    lf = results[run]
    assert lf["patched"] is not None and len(lf["losses"]) == STEPS
    if objective == "target_sft":
        kw = {**kw, "teacher_model": str(work / "teacher")}
    losses, final = qtarget_train(work, objective, **kw)
    assert len(losses) == STEPS
    assert lf["losses"] == pytest.approx(losses, rel=2e-5), (lf["losses"], losses)
    assert abs(losses[-1] - losses[0]) > 1e-3  # the three steps trained
    diff = max_weight_diff(Path(lf["output_dir"]), final)
    print(f"{objective}: LLaMA-Factory launcher losses {lf['losses']}, qtarget train {losses}, "
          f"max |weight difference| {diff:.3g}")
    assert diff < 1e-5


@pytest.mark.llamafactory
@lf_venv
@pytest.mark.parametrize("suffix,weights", [("", "model.safetensors"), ("_lora", "adapter_model.safetensors")])
def test_launcher_dft_equals_llamafactory_use_dft_loss(lf_runs, suffix, weights):
    _, results = lf_runs
    ours, theirs = results["qtarget_dft" + suffix], results["llamafactory_use_dft_loss" + suffix]
    assert theirs["patched"] is None and len(theirs["losses"]) == STEPS and ours["patched"] is not None
    assert ours["losses"] == pytest.approx(theirs["losses"], rel=2e-5), (ours["losses"], theirs["losses"])
    assert abs(ours["losses"][-1] - ours["losses"][0]) > 1e-3  # the three steps trained
    diff = max_weight_diff(Path(ours["output_dir"]), Path(theirs["output_dir"]), weights)
    print(f"dft{suffix}: launcher {ours['losses']}, use_dft_loss {theirs['losses']}, max |weight difference| "
          f"{diff:.3g}")
    assert diff < 1e-5


@pytest.mark.llamafactory
@lf_venv
def test_patch_under_llamafactorys_transformers_equals_token_loss():
    """qtarget.patch under transformers 5.6 (LLaMA-Factory 0.9.5's pin): every objective's patched loss and
    gradient against token_loss on the full logits."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([str(LF_PYTHON), str(ROOT / "tests" / "test_integration_llamafactory_driver.py"), "patch"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["transformers"] == "5.6.0"
    assert {"sft", "dft", "target_sft", "asft", "kd", "eaft"} <= set(out["objectives"])
    for name, r in out["objectives"].items():
        assert r["loss"] == pytest.approx(r["reference"], rel=1e-5, abs=1e-6), (name, r)
        assert r["grad_max_abs_diff"] <= 1e-4 * max(r["grad_max_abs"], 1e-3), (name, r)
