"""Lab outputs: report.md (table objective x metric, mean ± std over seeds), curves.png (loss, NLL,
p_y, entropy per objective), accuracy.png (bars), results.json (everything)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

# (column title, how to read it from one run, decimals)
COLUMNS: list[tuple[str, str, int]] = [
    ("in-domain acc", "in_domain.accuracy", 3),
    ("OOD acc", "ood.accuracy", 3),
    ("entropy (held-out)", "heldout.entropy", 3),
    ("NLL (held-out)", "heldout.nll", 3),
    ("final train loss", "train.loss", 4),
    ("final train NLL", "train.nll", 3),
    ("train s", "train.seconds", 0),
]
CURVE_KEYS = ("loss", "nll", "p_y", "entropy")


def final_train(history: Sequence[dict], key: str) -> float | None:
    """Mean of `key` over the last quarter (at least 1) of the logged steps."""
    vals = [r[key] for r in history if isinstance(r.get(key), (int, float))]
    if not vals:
        return None
    k = max(1, len(vals) // 4)
    return sum(vals[-k:]) / k


def run_values(run: dict[str, Any]) -> dict[str, float | None]:
    m = run["metrics"]
    hist = run.get("history")
    return {
        "in_domain.accuracy": m["in_domain"]["accuracy"],
        "ood.accuracy": m["ood"]["accuracy"],
        "heldout.entropy": m["heldout"]["entropy"],
        "heldout.nll": m["heldout"]["nll"],
        "train.loss": final_train(hist, "loss") if hist else None,
        "train.nll": final_train(hist, "nll") if hist else None,
        "train.seconds": run.get("train_seconds"),
    }


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return mean, std, len(xs)


def summarize_rows(rows: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{row: {metric key: {mean, std, n}}}"""
    out = {}
    for name, row in rows.items():
        vals = [run_values(r) for r in row["runs"]]
        out[name] = {}
        for _, key, _ in COLUMNS:
            mean, std, n = mean_std([v[key] for v in vals])
            out[name][key] = {"mean": mean, "std": std, "n": n}
    return out


def _cell(stat: dict[str, float | None], decimals: int) -> str:
    if stat["mean"] is None:
        return "—"
    text = f"{stat['mean']:.{decimals}f}"
    if stat["std"] is not None:
        text += f" ± {stat['std']:.{decimals}f}"
    return text


def markdown_table(summary: dict[str, Any]) -> str:
    head = "| objective | " + " | ".join(c[0] for c in COLUMNS) + " |"
    sep = "|---|" + "|".join("---:" for _ in COLUMNS) + "|"
    lines = [head, sep]
    for name, stats in summary.items():
        lines.append(f"| {name} | " + " | ".join(_cell(stats[key], d) for _, key, d in COLUMNS) + " |")
    return "\n".join(lines)


def _std_error(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def plot_curves(rows: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_KEYS), figsize=(4.2 * len(CURVE_KEYS), 3.4), squeeze=False)
    for ax, key in zip(axes[0], CURVE_KEYS):
        for name, row in rows.items():
            runs = [r for r in row["runs"] if r.get("history")]
            if not runs:
                continue
            by_step: dict[int, list[float]] = {}
            for r in runs:
                for h in r["history"]:
                    if isinstance(h.get(key), (int, float)):
                        by_step.setdefault(int(h["step"]), []).append(float(h[key]))
            steps = sorted(by_step)
            ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], label=name, marker=".")
        ax.set_title({"loss": "training loss (objective's own scale)", "nll": "NLL of demonstrated tokens",
                      "p_y": "mean p_y", "entropy": "mean predictive entropy"}[key], fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_accuracy(summary: dict[str, Any], n_eval: dict[str, int], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.4))
    width = 0.38
    for j, (key, label) in enumerate((("in_domain.accuracy", "in-domain"), ("ood.accuracy", "OOD (forgetting)"))):
        means = [summary[n][key]["mean"] or 0.0 for n in names]
        # error bar: std over seeds when there are several, else the binomial standard error
        errs = [summary[n][key]["std"] if summary[n][key]["std"] is not None
                else _std_error(summary[n][key]["mean"] or 0.0, n_eval[key]) for n in names]
        xs = [i + (j - 0.5) * width for i in range(len(names))]
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylabel("accuracy (greedy)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def render_markdown(results: dict[str, Any], summary: dict[str, Any]) -> str:
    s = results["settings"]
    model = results["model"]
    t = results["timings"]
    data = results["data"]
    teacher = results.get("teacher")
    n_seeds = s["seeds"]
    n_id, n_ood = data["in_domain"]["n"], data["ood"]["n"]
    lines = [
        "# qtarget lab report",
        "",
        f"Model: **{model['name']}**, the same starting point for every row. Preset `{s['preset']}`, "
        f"seed {s['seed']}, {n_seeds} training seed(s) per objective; "
        + ("cells are mean ± std over seeds." if n_seeds > 1 else
           "one seed, so no ± std (pass `--seeds 3` for mean ± std)."),
        "",
        markdown_table(summary),
        "",
        "![accuracy](accuracy.png)",
        "",
        "![training curves](curves.png)",
        "",
        "## What was run",
        "",
        f"- **Task (in-domain)**: procedural multi-step arithmetic word problems with a compact chain of "
        f"thought, one equation per step. Example prompt: `{data['in_domain']['example'].splitlines()[0]}` — "
        f"demonstration: `{data['in_domain']['example_solution']}`",
        f"- **Demonstration noise**: `--noise {s['noise']}`: that share of the {s['train_examples']} training "
        f"demonstrations is noisy, half with a corrupted step (wrong result carried to a wrong final answer), half "
        f"in a non-unique alternative form (operands swapped, words instead of symbols, another closing "
        f"phrase). Seed {s['seed']} counts: {data['noise_counts_seed0']}.",
        f"- **Out-of-domain (forgetting)**: unit conversions (`{data['ood']['example'].splitlines()[0]}`), a task "
        f"type the demonstrations never show; {n_ood} problems.",
        f"- **Evaluation**: greedy decoding, at most {s['max_new_tokens']} new tokens, {n_id} held-out in-domain "
        f"problems (disjoint from all training questions), graded by exact match of the stated final integer "
        f"(`The answer is N`, else the last number). Entropy and NLL: teacher-forced over the response tokens "
        f"of {data['heldout_examples']} held-out clean demonstrations. With one seed, the standard error of an "
        f"accuracy p over n problems is sqrt(p(1-p)/n) (≈ {_std_error(0.5, n_id):.2f} at p = 0.5, n = {n_id}): "
        f"differences smaller than that are noise.",
        f"- **Training (identical for every objective)**: the library's trainer (`qtarget.training.train`, fused "
        f"loss), {s['steps']} optimizer steps of {s['batch_size']} demonstrations, AdamW lr {s['learning_rate']:g}, "
        f"{s['lr_scheduler']} schedule with {s['warmup_ratio']:.0%} warm-up, max grad norm 1. Only the top "
        f"{s['train_top_layers'] or 'all'} of {model['layers']} decoder layers (and the final norm) are trained; "
        f"embeddings / LM head and the bottom layers are frozen, for every objective alike "
        f"({_trainable_text(results)}).",
        "- **Objectives** (SPEC §3 settings, scaled to the run): "
        + "; ".join(_objective_text(o, s) for o in s["objectives"]) + ".",
    ]
    if teacher:
        state = ("loaded from the cache" if teacher.get("cached") else
                 f"trained in this run in {teacher.get('trained_seconds') or 0:.0f} s and cached")
        lines.append(f"- **Teacher for target_sft**: {teacher['description']}; {state} "
                     f"(`{teacher['path']}`).")
    lines += [
        "",
        "## Time",
        "",
        _time_text(results),
        "",
        "Everything above comes out of the run as is: no objective-specific tuning. `results.json` holds "
        "every number, the per-step training history, the settings and each generated answer.",
        "",
    ]
    return "\n".join(lines)


def _time_text(results: dict[str, Any]) -> str:
    t, model, threads = results["timings"], results["model"], results["torch_threads"]
    teacher = results.get("teacher") or {}
    text = f"Wall time {t['total']:.0f} s with {threads} torch thread(s) (model load {t['load_model']:.0f} s"
    if not model.get("was_cached"):
        text += f", of which {model['cache_seconds']:.0f} s converting the GGUF into the cache on this first run"
    text += ")"
    if "teacher" in t:
        text += (f"; the teacher was loaded from the cache in {t['teacher']:.0f} s" if teacher.get("cached") else
                 f"; training the teacher took {t['teacher']:.0f} s (a one-time cost: later runs load it)")
    text += "."
    if "cpu" in t:
        text += (f" The process used {t['cpu']:.0f} CPU-seconds; on a machine shared with other jobs the wall time "
                 f"grows, while CPU-seconds / {threads} (≈ {t['cpu'] / threads:.0f} s) is about the wall time with "
                 f"{threads} otherwise idle core(s).")
    return text


def _trainable_text(results: dict[str, Any]) -> str:
    for name, row in results["rows"].items():
        for r in row["runs"]:
            if r.get("params"):
                p = r["params"]
                return f"{p['trainable'] / 1e6:.1f}M of {p['total'] / 1e6:.1f}M parameters trainable"
    return "no trained run"


def _objective_text(name: str, s: dict[str, Any]) -> str:
    args = s["objective_args"].get(name, {})
    extra = {
        "sft": "−log p_y",
        "dft": "−sg(p_y) log p_y",
        "psft": f"PPO-clipped ratio to π_old, ε = {args.get('eps')}, M = {s['psft_updates_per_batch']} mini-batch "
                f"updates per π_old refresh (paper: 8)",
        "asft": f"DFT + λ·KL(π_base ‖ p), λ = {args.get('lam')}, π_base = the frozen base model",
        "target_sft": f"Q = p_y δ_y + (1 − p_y) π̃, π̃ ∝ p^(1−η) π_T^η, η = {args.get('eta')}",
    }.get(name, "")
    return f"`{name}` ({extra})"


def write_outputs(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write report.md, results.json, curves.png and accuracy.png into `out`."""
    out = Path(out)
    summary = summarize_rows(results["rows"])
    results["summary"] = summary
    n_eval = {"in_domain.accuracy": results["data"]["in_domain"]["n"], "ood.accuracy": results["data"]["ood"]["n"]}
    paths = {
        "curves": plot_curves(results["rows"], out / "curves.png"),
        "accuracy": plot_accuracy(summary, n_eval, out / "accuracy.png"),
    }
    report = out / "report.md"
    report.write_text(render_markdown(results, summary), encoding="utf-8")
    paths["report"] = report
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=_json_default), encoding="utf-8")
    os.replace(tmp, out / "results.json")
    paths["results"] = out / "results.json"
    return paths


def _json_default(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    return str(v)
