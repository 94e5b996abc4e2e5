"""`qtarget inspect`: what target each objective pushes p toward, on one example position.

For a seeded example distribution p over a small vocabulary, an observed token y, a teacher and a
reference distribution, prints p, each objective's implied target Q, label trust gamma, scale c and
the top alternatives of the residual pi_tilde = (Q - gamma delta_y) / (1 - gamma). `--plot` draws p
against each Q.
"""
from __future__ import annotations

import argparse
import json

import torch

from qtarget import cli
from qtarget.analysis import implied_target
from qtarget.objectives import get_objective, list_objectives, objective_parameters, token_loss
from qtarget.objectives.registry import RULE_PARAMETERS, objective_doc, rule_parameters

PARAM_FLAGS = {"lam": float, "alpha": float, "tau": float, "k": int, "eps": float, "beta": float,
               "temperature": float, "eta": float, "q": float, "side": str,
               "gamma_from": str, "gamma_min": float, "gamma_max": float, "gain": float, "smooth": float,
               "scale": float, "floor": float}
TOKENS = ["the", "answer", "is", "4", "5", "four", "=", "so", "therefore", "\\boxed", "we", "get",
          "2+2", "sum", "total", "."]


def example_position(vocab: int, seed: int, label: int | None):
    """A seeded example: student logits [1, V], label [1], teacher/ref logits, old log-prob."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, vocab, generator=g) * 2.0
    if label is None:  # the interesting case: the observed token is plausible but not the mode
        label = int(z[0].argsort(descending=True)[min(2, vocab - 1)])
    if not 0 <= label < vocab:
        raise ValueError(f"--label must be in [0, {vocab}), got {label}")
    y = torch.tensor([label])
    aux = {
        "teacher_logits": torch.randn(1, vocab, generator=g) * 2.0,
        "ref_logits": z + torch.randn(1, vocab, generator=g) * 0.5,
        "token_weights": torch.tensor([0.5]),
    }
    logp_y = torch.log_softmax(z, -1)[0, label]
    aux["old_logprobs"] = (logp_y + 0.1).reshape(1)  # r = e^-0.1 ~ 0.905: PSFT's unclipped regime
    return z, y, aux


def _token_names(vocab: int) -> list[str]:
    return [TOKENS[i] if i < len(TOKENS) else f"tok{i}" for i in range(vocab)]


def inspect_objectives(names: list[str], params: dict, vocab: int = 12, seed: int = 0, label: int | None = None):
    """Rows of {name, gamma, scale, loss, Q [V], residual_top [(token, prob)]} plus the example."""
    z, y, aux = example_position(vocab, seed, label)
    rows = []
    for name in names:
        accepted = set(objective_parameters(name))
        if name == "target":  # of the rule parameters, only those its chosen rules read
            accepted = (accepted - set(RULE_PARAMETERS)) | rule_parameters(params.get("gamma", "p_y"),
                                                                          params.get("residual", "student"))
        objective = get_objective(name, **{k: v for k, v in params.items() if k in accepted})
        Q, c = implied_target(objective, z, y, return_scale=True, **aux)
        res = token_loss(objective, z, y, **aux)
        gamma = res.metrics["gamma"]
        Q = Q[0]
        residual_top = []
        if gamma < 1 - 1e-6:
            residual = (Q - gamma * torch.nn.functional.one_hot(y, vocab)[0]) / (1 - gamma)
            order = residual.argsort(descending=True)
            residual_top = [(int(i), float(residual[i])) for i in order[:3]]
        rows.append({"name": name, "objective": repr(objective), "gamma": gamma, "scale": float(c[0]),
                     "loss": float(res.loss.detach()), "Q": Q.tolist(), "residual_top": residual_top,
                     "signed": bool((Q < -1e-6).any())})
    return {"p": torch.softmax(z, -1)[0].tolist(), "label": int(y[0]), "tokens": _token_names(vocab), "rows": rows}


def format_report(result: dict) -> str:
    tokens, p, rows, y = result["tokens"], result["p"], result["rows"], result["label"]
    width = max(9, *(len(r["name"]) for r in rows)) + 1
    head = f"{'token':>10} {'p':>8} " + " ".join(f"{r['name'][:width - 1]:>{width}}" for r in rows)
    lines = [f"Example position: observed token y = {tokens[y]!r} (id {y}), p(y) = {p[y]:.3f}",
             "Implied targets Q (dL/dz = c (p - Q)):", head]
    for v, tok in enumerate(tokens):
        mark = "*" if v == y else " "
        lines.append(f"{tok + mark:>10} {p[v]:8.3f} " + " ".join(f"{r['Q'][v]:{width}.3f}" for r in rows))
    lines.append("")
    for r in rows:
        alt = ", ".join(f"{tokens[i]}={q:.2f}" for i, q in r["residual_top"]) or "-"
        note = "  (signed target: Q has negative entries)" if r["signed"] else ""
        lines.append(f"{r['objective']}: gamma={r['gamma']:.3f} c={r['scale']:.3f} loss={r['loss']:.4f} "
                     f"residual top: {alt}{note}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    from matplotlib.figure import Figure  # noqa: PLC0415 - matplotlib: the 'plots' extra

    rows, tokens = result["rows"], result["tokens"]
    cols = min(4, len(rows))
    nrows = (len(rows) + cols - 1) // cols
    fig = Figure(figsize=(4 * cols, 2.8 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    xs = range(len(tokens))
    for ax, r in zip(axes.flat, rows):
        ax.bar([x - 0.2 for x in xs], result["p"], width=0.4, label="p", color="#9aa5b1")
        ax.bar([x + 0.2 for x in xs], r["Q"], width=0.4, label="Q", color="#d1495b")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_title(f"{r['name']} (gamma={r['gamma']:.2f})", fontsize=9)
        ax.set_xticks(list(xs), [t + ("*" if i == result["label"] else "") for i, t in enumerate(tokens)],
                      rotation=90, fontsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("model distribution p vs implied target Q (* = observed token)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    ap = cli.ArgumentParser(prog="qtarget inspect", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("objectives", nargs="*", help="objective names (default: the whole catalogue)")
    ap.add_argument("--vocab", type=int, default=12, help="size of the example vocabulary (default 12)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the example distribution")
    ap.add_argument("--label", type=int, default=None, help="observed token id (default: the 3rd most likely)")
    ap.add_argument("--plot", metavar="PNG", help="also draw p against each Q into this PNG file")
    ap.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    for flag, typ in PARAM_FLAGS.items():
        ap.add_argument(f"--{flag}", type=typ, default=None, help=f"objective parameter `{flag}` where accepted")
    ap.add_argument("--gamma", default=None, help="gamma rule for the general `target` objective")
    ap.add_argument("--residual", default=None, help="residual rule for the general `target` objective")
    return ap


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    names = args.objectives or list_objectives()
    params = {k: getattr(args, k) for k in list(PARAM_FLAGS) + ["gamma", "residual"] if getattr(args, k) is not None}
    if args.vocab < 2:
        raise ValueError(f"--vocab must be >= 2, got {args.vocab}")  # qtarget.cli prints it as one line, exit 2
    result = inspect_objectives(names, params, vocab=args.vocab, seed=args.seed, label=args.label)
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
        print(f"\nplot written to {args.plot}")
    return 0


def list_main(argv: list[str]) -> int:
    """`qtarget objectives`: the catalogue with parameters and auxiliary inputs."""
    cli.ArgumentParser(prog="qtarget objectives", description="List the objective catalogue.").parse_args(argv)
    for name in list_objectives():
        params = objective_parameters(name)
        needs = ", ".join(sorted(get_objective(name).needs)) or "-"
        doc = objective_doc(name)
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items()) or "-"
        print(f"{name:<16} params: {shown:<40} needs: {needs:<14} {doc}")
    return 0
