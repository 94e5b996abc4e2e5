"""Lab outputs, formatted from the results dict (no statistics computed here): report.md (prior profiles,
the continuum table, and per task: metric table, differences from SFT, the fixes of DFT's low-prior failure,
claims, verdicts against the training budget; then sweep, what was run, time), the plots of
`qtarget.lab.plots`, results.json (everything, including the per-item values behind every interval),
results.csv (one line per task, row and metric) and curves.csv (learning curves, verdicts per checkpoint)."""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from qtarget.lab.analysis import METRIC_BY_KEY, METRICS
from qtarget.lab.plots import (TABLE_METRICS, plot_budget, plot_curves, plot_effects, plot_learning_curves, plot_prior,
                               plot_sweep)

# table columns (TABLE_METRICS; the held-out NLL is in results.json / results.csv)
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
                     + (f" ({why})" if (why := c.get("reason") or c.get("note")) else "") + " |")
    return "\n".join(lines)


def winners_table(results: dict[str, Any]) -> str | None:
    """Per decision metric: the trained row with the best value, its lead over the runner-up and whether the
    interval of that lead decides it (`analysis.winners`)."""
    if not results.get("winners"):
        return None
    lines = ["| metric | best row | its value | lead over the runner-up [95 % interval] | decided? |",
             "|---|---|---:|---:|---|"]
    for w in results["winners"]:
        m = METRIC_BY_KEY[w["metric"]]
        tied = w.get("tied") or []
        decided = ("yes: the lead's interval excludes 0" if w["decided"] else
                   "no: not separated from " + ", ".join(tied))
        lines.append(f"| {m.title} ({m.better} is better) | **{w['row']}** | {fmt(w['value'], m.decimals)} | "
                     f"{fmt(w['lead'], m.decimals, signed=True)} over {w['runner_up']} | {decided} |")
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


# ---------------------------------------------------------------------------------------- markdown
def slug(task: str) -> str:
    """A task name as a file-name part ("user:d.jsonl" -> "user_d.jsonl")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", task)


def task_view(results: dict[str, Any], task: str) -> dict[str, Any]:
    """The results of one task, with the run's settings / model / timings: what the one-task tables take."""
    return {**results, **results["per_task"][task]}


def prior_table(results: dict[str, Any]) -> str:
    lines = ["| task | demonstration tokens | base p_y mean | median | quartiles | share with p_y < 0.1 | prior |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, e in results["per_task"].items():
        p = e.get("prior")
        if p:
            lines.append(f"| {name} | {p['tokens']} | {p['mean']:.3f} | {p['median']:.3f} | {p['q1']:.3f}–{p['q3']:.3f} "
                         f"| {p['share_low']:.3f} | {e.get('prior_class') or '—'} |")
    return "\n".join(lines)


def continuum_table(results: dict[str, Any], metrics: Sequence[str] = ("gen_acc", "format_fail", "rank_margin",
                                                                        "heldout_nll", "noise_fit")) -> str:
    """Per task (with its prior class) and row: the paired difference from SFT on the continuum metrics."""
    lines = ["| task (prior) | row − sft | " + " | ".join(METRIC_BY_KEY[m].title for m in metrics) + " |",
             "|---|---|" + "|".join("---:" for _ in metrics) + "|"]
    for c in results.get("continuum", []):
        for row, diffs in c["vs_sft"].items():
            lines.append(f"| {c['task']} ({c.get('prior_class') or '?'}) | {row} | "
                         + " | ".join(fmt(diffs.get(m), METRIC_BY_KEY[m].decimals, signed=True) for m in metrics) + " |")
    return "\n".join(lines)


# what each distractor kind is, for the report (qtarget.lab.tasks.ranking_items; user data: qtarget.lab.user_task)
DISTRACTOR_TEXT = {
    "near": "the result slipped by ±2 (±1, ±3 where needed)", "final": "the last result slipped",
    "rule": "the operator under a wrong rule", "misread": "a number misread", "corrupt": "one step off, carried",
    "near miss": "every occurrence of the answer off by 2 (then 1, 3, ...)", "other row": "another held-out reply",
}


def _kinds(counts: dict[str, int] | None) -> str:
    if not counts:
        return ""
    return "; distractors: " + ", ".join(f"{DISTRACTOR_TEXT.get(k, k)} ({n})" for k, n in counts.items())


def budget_table(entry: dict[str, Any]) -> str:
    """One line per claim on a teacher-forced metric: its effect and verdict after each checkpoint."""
    steps = entry.get("curve_steps") or sorted({p["step"] for c in entry["budget"] for p in c["points"]})
    lines = ["| claim | " + " | ".join(f"after {st} steps" for st in steps) + " | depends on the budget? |",
             "|---|" + "|".join("---" for _ in steps) + "|---|"]
    for c in entry["budget"]:
        m = METRIC_BY_KEY[c["metric"]]
        by_step = {p["step"]: p for p in c["points"]}
        cells = []
        for st in steps:
            p = by_step.get(st)
            cells.append("—" if p is None else f"{fmt(p['effect'], m.decimals, signed=True)} {p['verdict']}")
        flag = ("**yes: flips** (supported at one budget, contradicted at another)" if c["flips"] else
                "yes: the verdict changes" if c["changes"] else "no")
        lines.append(f"| {c['statement']} ({c['row']} − {c['versus']}) | " + " | ".join(cells) + f" | {flag} |")
    return "\n".join(lines)


FIX_ROWS = ("dft", "dft_floor", "prift", "sft")


def fixes_table(entry: dict[str, Any]) -> str | None:
    """DFT's low-prior failure and the rows that try to fix it: format failures, accuracy, noise fit."""
    rows = [r for r in FIX_ROWS if r in entry["estimates"]]
    if not {"dft_floor", "prift"} & set(rows):
        return None
    keys = ("format_fail", "gen_acc", "noise_fit")
    lines = ["| row | " + " | ".join(METRIC_BY_KEY[k].title for k in keys) + " | noise fit − sft |",
             "|---|" + "|".join("---:" for _ in keys) + "|---:|"]
    for r in rows:
        e, d = entry["estimates"][r], entry["vs_reference"].get(r, {})
        lines.append(f"| {r} | " + " | ".join(fmt(e.get(k), METRIC_BY_KEY[k].decimals) for k in keys)
                     + f" | {fmt(d.get('noise_fit'), 3, signed=True)} |")
    return "\n".join(lines)


def render_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    model = results["model"]
    n_seeds = s["seeds"]
    level = "bootstrap over items" + (f" and over the {n_seeds} training seeds" if n_seeds > 1 else "")
    names = list(results["per_task"])
    lines = [
        "# qtarget lab report",
        "",
        f"Model: **{model['name']}**, the same starting point for every row. Preset `{s['preset']}`, seed "
        f"{s['seed']}, {n_seeds} training seed(s) per row, {len(names)} task(s): "
        + ", ".join(f"`{n}`" for n in names) + f". Every cell is the value and its 95 % interval ({level}, "
        f"{s['n_boot']} replicates); `results.json` holds the per-item values behind each one.",
        "",
    ]
    if any(e.get("prior") for e in results["per_task"].values()):
        lines += ["## Prior profiles", "",
                  "How probable each task's clean demonstrations already are under the base model (p_y of every "
                  "demonstration token). With several tasks, the one with the smallest share of tokens at p_y < 0.1 "
                  "is the *strong-prior* task and the one with the largest the *weak-prior* task (when the shares "
                  "differ by at least 0.03); a task on its own is strong-prior when its median p_y is at least 0.5 "
                  "and fewer than 20 % of its tokens have p_y < 0.1. The continuum claims follow that class.", "", prior_table(results), "", "![prior profiles](prior.png)", ""]
    if len(names) > 1 and results.get("continuum"):
        lines += ["## The continuum: each row against SFT, per task", "",
                  "Paired differences from SFT (95 % intervals). The model-capability continuum (arXiv "
                  "2510.00526) expects prior-leaning objectives (DFT) ≥ SFT on the strong-prior task and SFT ≥ "
                  "them on the weak-prior one; the per-task claims tables give the computed verdicts.", "",
                  continuum_table(results), ""]
    for name in names:
        lines += _task_section(task_view(results, name), s)
    if s["sweep"]:
        lines += ["## Sweep", "",
                  "Swept: " + "; ".join(f"`{o}.{p}` ∈ {{{', '.join(map(str, v))}}}" for o, p, v in s["sweep"])
                  + ". Every point uses the same data, seeds and training settings; `sft` is the gray band.", ""]
        lines += [f"![sweep, task {n}](sweep_{slug(n)}.png)" for n in names] + [""]
    lines += ["## Metrics", ""]
    lines += [f"- **{m.title}**: {m.meaning}." for m in METRICS]
    lines += ["", "## What was run", ""]
    lines += _run_text(results, s, model)
    lines += ["", "## Time", "", _time_text(results), "",
              "Everything above comes out of the run as is: no objective-specific tuning, no hand-written "
              "verdicts.", ""]
    return "\n".join(lines)


def _task_section(view: dict[str, Any], s: dict[str, Any]) -> list[str]:
    name = view["data"]["task"]["name"]
    cls = view.get("prior_class")
    lines = [f"## Task `{name}`" + (f" ({cls} prior)" if cls else ""), "", view["data"]["task"]["description"] + ".",
             "", metric_table(view), ""]
    warnings = format_warnings(view)
    if warnings:
        lines += ["**Malformed outputs.** Settings are the same for every objective and not tuned per objective; "
                  "these rows do not always produce a well-formed answer:", "", *warnings, ""]
    if any(view["vs_reference"].values()):
        lines += [f"### Difference from {view['reference']} (paired over the same items and seeds)", "",
                  difference_table(view), ""]
    fixes = fixes_table(view)
    if fixes:
        lines += ["### DFT's low-prior failure and its fixes", "",
                  "`dft_floor` floors DFT's γ = p_y at 0.2 and `prift` reads γ = p_y from the frozen base model "
                  "(PriFT), both through the general `target` objective. Does each state a final answer as often as "
                  "SFT, and what does it cost in noise fit?", "", fixes, ""]
    if view["claims"]:
        lines += ["### Claims", "",
                  "Each claim of the papers (SPEC §3), of the seeds and of the continuum, as this lab can measure "
                  "it, after the full training budget. The verdict is computed from the interval: *supported* when "
                  "it lies entirely on the claimed side (for ≥ / on-par claims: within the stated margin), "
                  "*contradicted* when it lies entirely on the other side, *inconclusive* otherwise — and "
                  "*inconclusive* whenever the metric does not separate (no trained row differs from the base "
                  "model beyond its interval). Every *inconclusive* verdict names the rule behind it: the margin "
                  "(the interval excludes 0 but not the margin), too few items (the interval still contains the "
                  "boundary; the items that would decide an effect of this size), a metric that does not separate, "
                  "or malformed answers. At this scale (135M model, CPU steps), not in general.", "",
                  claims_table(view), ""]
    won = winners_table(view)
    if won:
        lines += ["### Which row won", "",
                  "Per metric, the trained row with the best value and its paired lead over the next best row "
                  "(> 0 favours the winner). Decided only when that interval excludes 0; otherwise the rows named "
                  "are not separated from it at this number of items.", "", won, ""]
    if view.get("budget"):
        lines += ["### Verdicts against the training budget", "",
                  "Every claim on a teacher-forced metric, measured after each learning-curve checkpoint of the "
                  "same runs: a verdict that changes with the budget says so.", "", budget_table(view), "",
                  f"![budget, task {name}](budget_{slug(name)}.png)", "",
                  f"![learning curves, task {name}](learning_{slug(name)}.png)", ""]
    lines += [f"![metrics with intervals, task {name}](effects_{slug(name)}.png)", "",
              f"![training curves, task {name}](curves_{slug(name)}.png)", ""]
    return lines


def _run_text(results: dict[str, Any], s: dict[str, Any], model: dict[str, Any]) -> list[str]:
    first = next(iter(results["per_task"].values()))
    lines = []
    for name, entry in results["per_task"].items():
        data = entry["data"]
        task = data["task"]
        lines += [
            f"- **Task `{name}`**: {task['description']}. Example: `{data['gen']['example']}` — "
            f"`{data['gen']['example_solution']}`. Noise `--noise {s['noise']}`: that share of the "
            f"{s['train_examples']} training demonstrations per seed is noisy, {task['noise']}. Seed {s['seed']}: "
            f"{data['noise_counts_seed0']}; tokens measured for noise fit per demonstration (those the noise changed; "
            f"for clean ones, the correct tokens a corruption would have changed): "
            f"{_fmt_counts(data['changed_tokens_per_noisy_demo'])}. Generation: {data['gen']['n']} held-out "
            f"problems, greedy, at most {s['max_new_tokens']} new tokens; correct = the stated final answer is right; "
            f"no stated answer = format failure. Answer ranking: {data['rank']['n']} other held-out problems, the "
            f"correct demonstration against {data['rank']['candidates_per_item'] - 1} distractors (chance "
            f"{1 / data['rank']['candidates_per_item']:.2f}{_kinds(data['rank'].get('distractor_kinds'))}); "
            f"held-out entropy / NLL on the correct ones."]
        teacher = entry.get("teacher")
        if teacher:
            state = ("given by the user" if teacher.get("given") else "loaded from the cache" if teacher.get("cached") else
                     f"trained in this run in {teacher.get('trained_seconds') or 0:.0f} s and cached")
            caches = [r["teacher_cache"] for row in entry["rows"].values() for r in row["runs"] if r.get("teacher_cache")]
            how = (f"Training reads it from a teacher cache (`qtarget teacher-cache`): its top-{caches[0]['top_k']} "
                   f"log-probs per demonstration token, computed once per run's data, the remaining mass spread like "
                   f"the student's p (tail `{caches[0]['tail']}`); no teacher forward per step." if caches else
                   "Training ran the teacher live, one forward per step (results from before the lab used the "
                   "teacher cache).")
            lines.append(f"  - Teacher for target_sft: {teacher['description']}; {state} (`{teacher['path']}`). {how}")
    data = first["data"]
    curve = (f" Teacher-forced metrics are also measured after steps {', '.join(map(str, first['curve_steps']))} "
             f"(the learning curves)." if len(first.get("curve_steps") or []) > 1 else
             " No learning curves (`--curve_points 1`: the end of training only)." if first.get("curve_steps") else "")
    lines += [
        f"- **Forgetting**: {data['ood']['n']} paragraphs of {data['ood']['source']} (Python "
        f"{data['ood']['python']}), first {data['ood']['max_tokens']} tokens, plain text.",
        f"- **Teacher-forced scoring**: {data['sequences_scored_per_model']} sequences per model and task, one forward "
        "each; " + (f"the bottom {data['shared_trunk_layers']} layers are frozen and shared by every row, so their "
                    "output is computed once with the base model"
                    + (" — for scoring and for training, where every objective and seed runs the top layers only."
                       if first.get("curve_steps") else " (for scoring).") if data['shared_trunk_layers'] else
                    "full forwards."),
        f"- **Training (identical for every row)**: the library's trainer (`qtarget.training.train`), "
        f"{s['steps']} optimizer steps of {s['batch_size']} demonstrations, AdamW lr {s['learning_rate']:g}, "
        f"{s['lr_scheduler']} schedule with {s['warmup_ratio']:.0%} warm-up, max grad norm 1; only the top "
        f"{s['train_top_layers'] or 'all'} of {model['layers']} decoder layers (and the final norm) train "
        f"({_trainable_text(first)}); {_precision_text(s)}.{curve}",
        "- **Rows**: " + "; ".join(_row_text(name, row, s) for name, row in first["rows"].items()) + "."]
    return lines


def _precision_text(s: dict[str, Any]) -> str:
    if s.get("precision", "fp32") == "fp32":
        return "everything in float32"
    return ("matrix products in bfloat16 (torch.autocast; float32 weights, optimizer state and loss math), for "
            "training, scoring and generation alike, base model included")


def _fmt_counts(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in d.items()) or "none"


def _time_text(results: dict[str, Any]) -> str:
    t, model, threads = results["timings"], results["model"], results["torch_threads"]
    scoring = sum(v for k, v in t.items() if k.endswith("base_scoring"))
    text = (f"Wall time {t['total']:.0f} s with {threads} torch thread(s) (model load {t['load_model']:.0f} s"
            + ("" if model.get("was_cached") else
               f", of which {model['cache_seconds']:.0f} s converting the GGUF into the cache on this first run")
            + f"; base-model scoring {scoring:.0f} s)")
    for name, entry in results["per_task"].items():
        teacher, key = entry.get("teacher") or {}, f"{name}.teacher"
        if key in t:
            text += (f"; the `{name}` teacher was loaded from the cache in {t[key]:.0f} s" if teacher.get("cached") else
                     f"; training the `{name}` teacher took {t[key]:.0f} s (a one-time cost: later runs load it)")
    text += "."
    runs = [r for e in results["per_task"].values() for row in e["rows"].values() for r in row["runs"]]
    train = sum(r.get("train_seconds") or 0 for r in runs)
    evals = sum(r.get("eval_seconds") or 0 for r in runs)
    text += f" Training {train:.0f} s, measuring {evals:.0f} s in all"
    if any("gen_seconds" in r for r in runs):
        part = {k: sum(r.get(k) or 0 for r in runs) for k in ("checkpoint_seconds", "score_seconds", "gen_seconds")}
        text += (f" (training includes {part['checkpoint_seconds']:.0f} s of teacher-forced scoring at the "
                 f"learning-curve checkpoints; measuring: {part['score_seconds']:.0f} s teacher-forced scoring, "
                 f"{part['gen_seconds']:.0f} s generation)")
    text += "."
    if "cpu" in t:
        text += (f" The process used {t['cpu']:.0f} CPU-seconds (≈ {t['cpu'] / threads:.0f} s of wall time on "
                 f"{threads} otherwise idle core(s)).")
    if "load_start" in t:
        text += (f" The machine's load (1-minute average) was {t['load_start']:.1f} when the run started and "
                 f"{t['load_end']:.1f} when it ended.")
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
    """One line per task, row and metric (the columns of the one-task lab, then `task`)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row", "metric", "value", "lo", "hi", "n", "seeds", "diff_vs_ref", "diff_lo", "diff_hi", "task"])
        for task, entry in results["per_task"].items():
            for row, ests in entry["estimates"].items():
                for key, e in ests.items():
                    d = entry["vs_reference"].get(row, {}).get(key) or {}
                    w.writerow([row, key, e["value"], e["lo"], e["hi"], e["n"], e["seeds"], d.get("value", ""),
                                d.get("lo", ""), d.get("hi", ""), task])
    return path


def write_curves_csv(results: dict[str, Any], path: Path) -> Path:
    """The learning curves and the verdicts against the budget: one line per task, row, step and metric
    (`kind` "metric"), and per task, claim and step (`kind` "claim", with its verdict)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["task", "kind", "row", "metric", "step", "value", "lo", "hi", "versus", "verdict"])
        for task, entry in results["per_task"].items():
            for row, by_step in (entry.get("curve_estimates") or {}).items():
                for step in sorted(by_step, key=int):
                    for key, e in by_step[step].items():
                        w.writerow([task, "metric", row, key, step, e["value"], e["lo"], e["hi"], "", ""])
            for c in entry.get("budget") or []:
                for p in c["points"]:
                    e = p["effect"]
                    w.writerow([task, "claim", c["row"], c["metric"], p["step"], e["value"], e["lo"], e["hi"],
                                c["versus"], p["verdict"]])
    return path


def write_outputs(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write report.md, results.json, results.csv, curves.csv and the plots into `out`: prior.png, and per
    task effects_<task>.png, curves_<task>.png, learning_<task>.png, budget_<task>.png (sweep_<task>.png)."""
    out = Path(out)
    paths: dict[str, Path] = {}
    if any(e.get("prior") for e in results["per_task"].values()):
        paths["prior"] = plot_prior(results["per_task"], out / "prior.png")
    for name in results["per_task"]:
        view, stem = task_view(results, name), slug(name)
        paths[f"effects_{stem}"] = plot_effects(view, out / f"effects_{stem}.png")
        paths[f"curves_{stem}"] = plot_curves(view["rows"], out / f"curves_{stem}.png")
        if view.get("budget"):
            paths[f"budget_{stem}"] = plot_budget(view, out / f"budget_{stem}.png")
            paths[f"learning_{stem}"] = plot_learning_curves(view, out / f"learning_{stem}.png")
        if results["settings"]["sweep"]:
            paths[f"sweep_{stem}"] = plot_sweep(view, out / f"sweep_{stem}.png")
    report = out / "report.md"
    report.write_text(render_markdown(results), encoding="utf-8")
    paths["report"] = report
    paths["csv"] = write_csv(results, out / "results.csv")
    paths["curves_csv"] = write_curves_csv(results, out / "curves.csv")
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
