"""Lab outputs, formatted from the results dict (no statistics computed here):
report.md (metric table, differences from SFT, claims, sweep, what was run, time), effects.png (every
metric per row with its interval), curves.png (training curves), sweep.png (metrics against the swept
parameter), results.json (everything, including the per-item values behind every interval) and
results.csv (one line per row and metric)."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

from qtarget.lab.analysis import METRIC_BY_KEY, METRICS

CURVE_KEYS = ("loss", "nll", "p_y", "entropy")
# table columns (the held-out NLL is in results.json / results.csv)
TABLE_METRICS = ("gen_acc", "format_fail", "rank_acc", "noise_fit", "forgetting", "entropy")
# what results.json files written before tasks were values said (the arithmetic task was the only one)
LEGACY_TASK = {"name": "shop", "description": "procedural arithmetic word problems with a compact chain of thought, "
               "one equation per step", "noise": "half with a corrupted step (a wrong result carried to a wrong final "
               "answer), half in a non-unique alternative form (operands swapped, words instead of symbols, another "
               "closing phrase)"}
FORMAT_WARN = 0.05  # a row whose format-failure rate exceeds this is named in the report


def fmt(est: dict | None, decimals: int = 3, signed: bool = False) -> str:
    """'0.412 [0.345, 0.480]' (value [95 % interval]); '—' when not measured."""
    if not est:
        return "—"
    sign = "+" if signed else ""
    return f"{est['value']:{sign}.{decimals}f} [{est['lo']:{sign}.{decimals}f}, {est['hi']:{sign}.{decimals}f}]"


def metric_table(results: dict[str, Any], metrics: Sequence[str] = TABLE_METRICS) -> str:
    head = "| row | " + " | ".join(METRIC_BY_KEY[m].title for m in metrics) + " |"
    lines = [head, "|---|" + "|".join("---:" for _ in metrics) + "|"]
    for row, ests in results["estimates"].items():
        lines.append(f"| {row} | " + " | ".join(fmt(ests.get(m), METRIC_BY_KEY[m].decimals) for m in metrics) + " |")
    return "\n".join(lines)


def difference_table(results: dict[str, Any], metrics: Sequence[str] = TABLE_METRICS) -> str:
    ref = results["reference"]
    lines = [f"| row − {ref} | " + " | ".join(METRIC_BY_KEY[m].title for m in metrics) + " |",
             "|---|" + "|".join("---:" for _ in metrics) + "|"]
    for row, diffs in results["vs_reference"].items():
        if diffs:
            lines.append(f"| {row} | " + " | ".join(fmt(diffs.get(m), METRIC_BY_KEY[m].decimals, signed=True)
                                                    for m in metrics) + " |")
    return "\n".join(lines)


def claims_table(results: dict[str, Any]) -> str:
    lines = ["| source | claim | measured | effect [95 % interval] | verdict |", "|---|---|---|---:|---|"]
    for c in results["claims"]:
        m = METRIC_BY_KEY[c["metric"]]
        lines.append(f"| {c['source']} | {c['statement']} | {m.title}: {c['row']} − {c['versus']} | "
                     f"{fmt(c['effect'], m.decimals, signed=True)} | **{c['verdict']}**"
                     + (f" ({c['note']})" if c.get("note") else "") + " |")
    return "\n".join(lines)


def format_warnings(results: dict[str, Any]) -> list[str]:
    out = []
    for row, ests in results["estimates"].items():
        e = ests.get("format_fail")
        if e and e["value"] > FORMAT_WARN:
            out.append(f"- **{row}**: {e['value']:.1%} of its greedy answers never state a final answer "
                       f"(95 % interval {e['lo']:.1%}–{e['hi']:.1%}); its generation accuracy counts those as "
                       f"not correct. The teacher-forced metrics do not depend on it.")
    return out


# --------------------------------------------------------------------------------------------- plots
def plot_effects(results: dict[str, Any], path: Path) -> Path:
    """One panel per metric: each row's value with its 95 % interval."""
    metrics = [m for m in METRICS if any(m.key in e for e in results["estimates"].values())]
    cols = 4
    n_rows = (len(metrics) + cols - 1) // cols
    fig = Figure(figsize=(4.3 * cols, 0.35 * len(results["estimates"]) * n_rows + 1.6 * n_rows))
    axes = fig.subplots(n_rows, cols, squeeze=False)
    names = list(results["estimates"])
    for ax, m in zip(axes.flat, metrics):
        ys, vals, los, his = [], [], [], []
        for i, row in enumerate(names):
            e = results["estimates"][row].get(m.key)
            if e:
                ys.append(i)
                vals.append(e["value"])
                los.append(e["value"] - e["lo"])
                his.append(e["hi"] - e["value"])
        ax.errorbar(vals, ys, xerr=[los, his], fmt="o", capsize=3)
        ref = results["estimates"].get(results["reference"], {}).get(m.key)
        if ref:
            ax.axvspan(ref["lo"], ref["hi"], color="tab:gray", alpha=0.2, lw=0)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.set_ylim(len(names) - 0.5, -0.5)
        ax.set_title(m.title + (f" ({m.better} is better)" if m.better else ""), fontsize=9)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"value and 95 % interval per row (gray band: {results['reference']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def plot_curves(rows: dict[str, Any], path: Path) -> Path:
    fig = Figure(figsize=(4.2 * len(CURVE_KEYS), 3.4))
    axes = fig.subplots(1, len(CURVE_KEYS), squeeze=False)
    for ax, key in zip(axes[0], CURVE_KEYS):
        for name, row in rows.items():
            by_step: dict[int, list[float]] = {}
            for r in row["runs"]:
                for h in r.get("history") or []:
                    if isinstance(h.get(key), (int, float)):
                        by_step.setdefault(int(h["step"]), []).append(float(h[key]))
            if by_step:
                steps = sorted(by_step)
                ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], label=name, marker=".")
        ax.set_title({"loss": "training loss (objective's own scale)", "nll": "NLL of demonstrated tokens",
                      "p_y": "mean p_y", "entropy": "mean predictive entropy"}[key], fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def plot_sweep(results: dict[str, Any], path: Path) -> Path:
    """Each metric against the first swept parameter (one line per value of a second one), with
    intervals; the reference row (sft) as a band."""
    sweep = results["settings"]["sweep"]
    objective, p1, values1 = sweep[0]
    second = sweep[1] if len(sweep) > 1 else None
    metrics = [m for m in METRICS if m.key in TABLE_METRICS]
    fig = Figure(figsize=(3.6 * len(metrics), 3.3))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    numeric = all(isinstance(v, (int, float)) for v in values1)
    xs = [float(v) for v in values1] if numeric else list(range(len(values1)))
    for ax, m in zip(axes[0], metrics):
        for v2 in (second[2] if second else [None]):
            pts = []
            for x, v1 in zip(xs, values1):
                row = next((r for r, d in results["rows"].items() if d.get("objective") == objective
                            and str(d["args"].get(p1)) == str(v1)
                            and (second is None or str(d["args"].get(second[1])) == str(v2))), None)
                e = results["estimates"].get(row, {}).get(m.key) if row else None
                if e:
                    pts.append((x, e["value"], e["value"] - e["lo"], e["hi"] - e["value"]))
            if pts:
                label = f"{second[1]}={v2}" if second else objective
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[[p[2] for p in pts], [p[3] for p in pts]],
                            marker="o", capsize=3, label=label)
        ref = results["estimates"].get(results["reference"], {}).get(m.key)
        if ref:
            ax.axhspan(ref["lo"], ref["hi"], color="tab:gray", alpha=0.25, lw=0, label=results["reference"])
        if not numeric:
            ax.set_xticks(xs)
            ax.set_xticklabels([str(v) for v in values1])
        ax.set_xlabel(f"{objective}.{p1}")
        ax.set_title(m.title, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


# ---------------------------------------------------------------------------------------- markdown
def render_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    model = results["model"]
    data = results["data"]
    task = data.get("task", LEGACY_TASK)
    n_seeds = s["seeds"]
    level = "bootstrap over items" + (f" and over the {n_seeds} training seeds" if n_seeds > 1 else "")
    lines = [
        "# qtarget lab report",
        "",
        f"Model: **{model['name']}**, the same starting point for every row. Preset `{s['preset']}`, seed "
        f"{s['seed']}, {n_seeds} training seed(s) per row. Every cell is the value and its 95 % interval "
        f"({level}, {s['n_boot']} replicates); `results.json` holds the per-item values behind each one.",
        "",
        metric_table(results),
        "",
    ]
    warnings = format_warnings(results)
    if warnings:
        lines += ["**Malformed outputs.** Settings are the same for every objective and not tuned per objective; "
                  "these rows do not always produce a well-formed answer:", "", *warnings, ""]
    if any(results["vs_reference"].values()):
        lines += [f"## Difference from {results['reference']} (paired over the same items and seeds)", "",
                  difference_table(results), ""]
    if results["claims"]:
        lines += ["## Claims", "",
                  "Each claim of the papers (SPEC §3) and of the seeds, as this lab can measure it. The verdict "
                  "is computed from the interval: *supported* when it lies entirely on the claimed side (for "
                  "≥ / on-par claims: within the stated margin), *contradicted* when it lies entirely on the "
                  "other side, *inconclusive* otherwise — at this scale (135M model, a few dozen CPU steps), not "
                  "in general.", "", claims_table(results), ""]
    if s["sweep"]:
        lines += ["## Sweep", "",
                  "Swept: " + "; ".join(f"`{o}.{p}` ∈ {{{', '.join(map(str, v))}}}" for o, p, v in s["sweep"])
                  + f". Every point uses the same data, seeds and training settings; `{results['reference']}` is "
                    f"the gray band.", "", "![sweep](sweep.png)", ""]
    lines += ["![metrics with intervals](effects.png)", "", "![training curves](curves.png)", "",
              "## Metrics", ""]
    lines += [f"- **{m.title}**: {m.meaning}." for m in METRICS]
    lines += ["", "## What was run", "",
              f"- **Task (in-domain)**: {task['description']}. Example: `{data['gen']['example']}` — "
              f"`{data['gen']['example_solution']}`",
              f"- **Demonstration noise** `--noise {s['noise']}`: that share of the {s['train_examples']} training "
              f"demonstrations per seed is noisy, {task['noise']}. Seed {s['seed']}: {data['noise_counts_seed0']}; "
              f"tokens measured for noise fit per "
              f"demonstration (those the noise changed; for clean ones, the correct tokens a corruption would have "
              f"changed): {_fmt_counts(data['changed_tokens_per_noisy_demo'])}.",
              f"- **Generation**: {data['gen']['n']} held-out problems, greedy, at most {s['max_new_tokens']} new "
              f"tokens; correct = the stated final answer is right; no stated answer = format failure.",
              f"- **Answer ranking**: {data['rank']['n']} other held-out problems, the correct demonstration against "
              f"{data['rank']['candidates_per_item'] - 1} corrupted ones (chance "
              f"{1 / data['rank']['candidates_per_item']:.2f}); held-out entropy / NLL on the correct ones.",
              f"- **Forgetting**: {data['ood']['n']} paragraphs of {data['ood']['source']} (Python "
              f"{data['ood']['python']}), first {data['ood']['max_tokens']} tokens, plain text.",
              f"- **Teacher-forced scoring**: {data['sequences_scored_per_model']} sequences per model, one forward "
              "each; " + (f"the bottom {data['shared_trunk_layers']} layers are frozen and shared by every row, so "
                          "their output is computed once with the base model." if data['shared_trunk_layers'] else
                          "full forwards."),
              f"- **Training (identical for every row)**: the library's trainer (`qtarget.training.train`), "
              f"{s['steps']} optimizer steps of {s['batch_size']} demonstrations, AdamW lr {s['learning_rate']:g}, "
              f"{s['lr_scheduler']} schedule with {s['warmup_ratio']:.0%} warm-up, max grad norm 1; only the top "
              f"{s['train_top_layers'] or 'all'} of {model['layers']} decoder layers (and the final norm) train "
              f"({_trainable_text(results)}).",
              "- **Rows**: " + "; ".join(_row_text(name, row, s) for name, row in results["rows"].items()) + "."]
    teacher = results.get("teacher")
    if teacher:
        state = ("given by the user" if teacher.get("given") else "loaded from the cache" if teacher.get("cached") else
                 f"trained in this run in {teacher.get('trained_seconds') or 0:.0f} s and cached")
        caches = [r["teacher_cache"] for row in results["rows"].values() for r in row["runs"] if r.get("teacher_cache")]
        how = (f"Training reads it from a teacher cache (`qtarget teacher-cache`): its top-{caches[0]['top_k']} "
               f"log-probs per demonstration token, computed once per run's data, the remaining mass spread like "
               f"the student's p (tail `{caches[0]['tail']}`); no teacher forward per step." if caches else
               "Training ran the teacher live, one forward per step (results from before the lab used the "
               "teacher cache).")
        lines.append(f"- **Teacher for target_sft**: {teacher['description']}; {state} (`{teacher['path']}`). {how}")
    lines += ["", "## Time", "", _time_text(results), "",
              "Everything above comes out of the run as is: no objective-specific tuning, no hand-written "
              "verdicts.", ""]
    return "\n".join(lines)


def _fmt_counts(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in d.items()) or "none"


def _time_text(results: dict[str, Any]) -> str:
    t, model, threads = results["timings"], results["model"], results["torch_threads"]
    teacher = results.get("teacher") or {}
    text = (f"Wall time {t['total']:.0f} s with {threads} torch thread(s) (model load {t['load_model']:.0f} s"
            + ("" if model.get("was_cached") else
               f", of which {model['cache_seconds']:.0f} s converting the GGUF into the cache on this first run")
            + f"; base-model scoring {t['base_scoring']:.0f} s)")
    if "teacher" in t:
        text += (f"; the teacher was loaded from the cache in {t['teacher']:.0f} s" if teacher.get("cached") else
                 f"; training the teacher took {t['teacher']:.0f} s (a one-time cost: later runs load it)")
    text += "."
    train = sum(r.get("train_seconds") or 0 for row in results["rows"].values() for r in row["runs"])
    evals = sum(r.get("eval_seconds") or 0 for row in results["rows"].values() for r in row["runs"])
    text += f" Training {train:.0f} s, measuring {evals:.0f} s in all."
    if "cpu" in t:
        text += (f" The process used {t['cpu']:.0f} CPU-seconds (≈ {t['cpu'] / threads:.0f} s of wall time on "
                 f"{threads} otherwise idle core(s)).")
    return text


def _trainable_text(results: dict[str, Any]) -> str:
    for row in results["rows"].values():
        for r in row["runs"]:
            if r.get("params"):
                p = r["params"]
                return f"{p['trainable'] / 1e6:.1f}M of {p['total'] / 1e6:.1f}M parameters trainable"
    return "no trained row"


def _row_text(name: str, row: dict[str, Any], s: dict[str, Any]) -> str:
    objective, args = row.get("objective"), row.get("args") or {}
    if objective is None:
        return "`base` (the untrained model)"
    what = {
        "sft": "−log p_y",
        "dft": "−sg(p_y) log p_y",
        "psft": f"PPO-clipped ratio to π_old, M = {s['psft_updates_per_batch']} updates per π_old refresh (paper: 8)",
        "asft": "DFT + λ·KL(π_base ‖ p), π_base = the frozen base model",
        "target_sft": "Q = p_y δ_y + (1 − p_y) π̃, π̃ ∝ p^(1−η) π_T^η",
    }.get(objective, f"objective `{objective}`")
    params = ", ".join(f"{k} = {v}" for k, v in args.items())
    return f"`{name}` ({what}{'; ' + params if params else ''})"


# ------------------------------------------------------------------------------------------- writing
def write_csv(results: dict[str, Any], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row", "metric", "value", "lo", "hi", "n", "seeds", "diff_vs_ref", "diff_lo", "diff_hi"])
        for row, ests in results["estimates"].items():
            for key, e in ests.items():
                d = results["vs_reference"].get(row, {}).get(key) or {}
                w.writerow([row, key, e["value"], e["lo"], e["hi"], e["n"], e["seeds"], d.get("value", ""),
                            d.get("lo", ""), d.get("hi", "")])
    return path


def write_outputs(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write report.md, results.json, results.csv, effects.png, curves.png (and sweep.png) into `out`."""
    out = Path(out)
    paths = {"effects": plot_effects(results, out / "effects.png"),
             "curves": plot_curves(results["rows"], out / "curves.png")}
    if results["settings"]["sweep"]:
        paths["sweep"] = plot_sweep(results, out / "sweep.png")
    report = out / "report.md"
    report.write_text(render_markdown(results), encoding="utf-8")
    paths["report"] = report
    paths["csv"] = write_csv(results, out / "results.csv")
    tmp = out / "results.json.tmp"
    # compact: the per-item values make an indented file several times larger
    tmp.write_text(json.dumps(results, separators=(",", ":"), default=_json_default), encoding="utf-8")
    os.replace(tmp, out / "results.json")
    paths["results"] = out / "results.json"
    return paths


def _json_default(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    if hasattr(v, "item"):
        return v.item()
    return str(v)
