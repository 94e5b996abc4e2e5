"""Independent float64 re-statements of SPEC §2, written from the formulas (not from the library).

`expected_loss` gives each objective's per-token loss; `expected_target` its implied target Q and
scale c such that dL/dz = c (p - Q). Used by the objective, fused-engine and property tests."""
from __future__ import annotations

import math

import torch

# name -> parameters used in the tests (non-default values, so defaults are not silently assumed)
CATALOGUE_PARAMS = {
    "sft": {},
    "label_smoothing": {"lam": 0.2},
    "dft": {},
    "prob": {"alpha": 0.5},
    "profit": {"tau": 0.05},
    "eaft": {"k": 20, "alpha": 1.5},
    "token_weighted": {},
    "sft_kl": {"lam": 0.3},
    "asft": {"lam": 0.1},
    "psft": {"eps": 0.2},
    "gem": {"beta": 0.6},
    "kd": {"temperature": 2.0},
    "distill_hybrid": {"lam": 0.4},
    "target_sft": {"eta": 0.3},
    "target": {"gamma": "power", "residual": "tempered", "alpha": 0.5, "beta": 0.5},
    # the catalogue of 2026 (docs/objectives.md): formulas below from the papers' code, not the library's
    "prob_masked": {"q": 0.05, "side": "above"},
    "nll_masked": {"q": 0.2, "side": "below"},
    "prift_prob": {},
    "prift_mass": {"tau": 0.7},
    "deft": {},
    # added after the 2026 catalogue (docs/objectives.md): formulas below from the official / found code
    "gift": {"beta": 6.0, "smooth": 0.05},
    "sed_sft": {"scale": 0.6, "k": 3, "tau": 0.9},
    "talr": {"tau": 2.5, "floor": 0.02},
}


def _parts(z, y):
    logp = torch.log_softmax(z.double(), -1)
    p = logp.exp()
    lpy = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return p, logp, lpy, lpy.exp()


def _kl(q, logp):
    logq = torch.where(q > 0, q.log(), torch.zeros_like(q))
    return (q * (logq - logp)).sum(-1)


def _teacher(aux, temperature=1.0):
    return torch.softmax(aux["teacher_logits"].double() / temperature, -1)


def expected_loss(name, params, z, y, aux):
    """Per-token loss [n] in float64 for flattened supervised rows z [n, V], y [n]."""
    p, logp, lpy, py = _parts(z, y)
    V = z.shape[-1]
    if name == "sft":
        return -lpy
    if name == "label_smoothing":
        lam = params["lam"]
        return -(1 - lam) * lpy - lam / V * logp.sum(-1)
    if name == "dft":
        return -py * lpy
    if name == "prob":
        a = params["alpha"]
        return (1 - py**a) / a
    if name == "profit":  # ProFit's code drops p_y < tau (trainer_utils._profit_cross_entropy)
        return -(py >= params["tau"]).double() * lpy
    if name == "eaft":
        k, a = params["k"], params["alpha"]
        top = p.topk(k, -1).values
        top = top / top.sum(-1, keepdim=True)
        H = -(top * top.log()).sum(-1)
        return -((H / math.log(k)) ** a) * lpy
    if name == "token_weighted":
        return -aux["token_weights"].double() * lpy
    if name == "sft_kl":
        pr = torch.softmax(aux["ref_logits"].double(), -1)
        return -lpy + params["lam"] * _kl(pr, logp)
    if name == "asft":
        pr = torch.softmax(aux["ref_logits"].double(), -1)
        return -py * lpy + params["lam"] * _kl(pr, logp)
    if name == "psft":
        eps = params["eps"]
        r = torch.exp(torch.clamp(lpy - aux["old_logprobs"].double(), -20, 20))
        return -torch.minimum(r, torch.clamp(r, 1 - eps, 1 + eps))
    if name == "gem":
        q = p ** (1 / params["beta"])
        q = q / q.sum(-1, keepdim=True)
        return -lpy + (q * logp).sum(-1)
    if name == "kd":
        return -(_teacher(aux, params["temperature"]) * logp).sum(-1)
    if name == "distill_hybrid":
        lam = params["lam"]
        return -(1 - lam) * lpy + lam * _kl(_teacher(aux), logp)
    if name in NEW_2026:
        return _loss_2026(name, params, p, lpy, py, aux, y)
    if name == "sed_sft":  # CE + s * 1[top-k mass < tau] * (p (p - 1) + 0.25), p differentiable
        return -lpy + params["scale"] * _sed_selected(p, params) * (py * (py - 1) + 0.25)
    if name == "talr":
        return -_talr_weight(py, params) * lpy
    Q, _ = expected_target(name, params, z, y, aux)
    return -(Q * logp).sum(-1)  # target_sft, target and gift are CE(Q, p) by definition


def expected_target(name, params, z, y, aux):
    """(Q [n, V], c [n]) in float64 from the SPEC's gamma and pi_tilde."""
    p, logp, lpy, py = _parts(z, y)
    n, V = z.shape
    delta = torch.nn.functional.one_hot(y, V).double()
    ones = torch.ones(n, dtype=torch.float64)
    student = p

    def mix(gamma, residual, c=ones):
        return gamma.unsqueeze(-1) * delta + (1 - gamma).unsqueeze(-1) * residual, c

    if name == "sft":
        return mix(ones, student)
    if name == "label_smoothing":
        return mix(ones * (1 - params["lam"]), torch.full_like(p, 1.0 / V))
    if name == "dft":
        return mix(py, student)
    if name == "prob":
        return mix(py ** params["alpha"], student)
    if name == "profit":
        return mix((py >= params["tau"]).double(), student)
    if name == "eaft":
        k, a = params["k"], params["alpha"]
        top = p.topk(k, -1).values
        top = top / top.sum(-1, keepdim=True)
        H = -(top * top.log()).sum(-1)
        return mix((H / math.log(k)) ** a, student)
    if name == "token_weighted":
        return mix(aux["token_weights"].double(), student)
    if name == "sft_kl":
        lam = params["lam"]
        return mix(ones / (1 + lam), torch.softmax(aux["ref_logits"].double(), -1), ones * (1 + lam))
    if name == "asft":
        lam = params["lam"]
        return mix(py / (py + lam), torch.softmax(aux["ref_logits"].double(), -1), py + lam)
    if name == "psft":
        eps = params["eps"]
        log_ratio = lpy - aux["old_logprobs"].double()
        r = torch.exp(log_ratio)
        active = (r <= 1 + eps) & (log_ratio.abs() < 20)
        return mix(torch.where(active, r, torch.zeros_like(r)), student)
    if name == "gem":
        q = p ** (1 / params["beta"])
        q = q / q.sum(-1, keepdim=True)
        return delta + p - q, ones
    if name == "kd":
        return mix(0 * ones, _teacher(aux, params["temperature"]))
    if name == "distill_hybrid":
        return mix(ones * (1 - params["lam"]), _teacher(aux))
    if name == "target_sft":
        eta = params["eta"]
        pi = p ** (1 - eta) * _teacher(aux) ** eta
        return mix(py, pi / pi.sum(-1, keepdim=True))
    if name in NEW_2026:
        return mix(_gamma_2026(name, params, p, py, aux, y), student)
    if name == "gift":  # softmax(log(mixed ref + 1e-10) + beta at the label), GIFT's code step by step
        return _gift_target(params, aux, y), ones
    if name == "sed_sft":  # dL/dz = (p - delta_y) (1 - s m p_y (2 p_y - 1))
        return delta, 1 - params["scale"] * _sed_selected(p, params) * py * (2 * py - 1)
    if name == "talr":
        return mix(_talr_weight(py, params), student)
    if name == "target":  # the CATALOGUE_PARAMS composition: gamma = p_y^alpha, residual ∝ p^(1/beta)
        q = p ** (1 / params["beta"])
        return mix(py ** params["alpha"], q / q.sum(-1, keepdim=True))
    raise KeyError(name)


NEW_2026 = ("prob_masked", "nll_masked", "prift_prob", "prift_mass", "deft")
DEFT_EPS = 1e-6  # DEFT's code: loss = -(exp(a log p) - 1) / (a + 1e-6)


def _side(py, params):
    """Beyond Log Likelihood's OnlyTop* keep p >= q, OnlyBottom* keep p <= q."""
    keep = py >= params["q"] if params["side"] == "above" else py <= params["q"]
    return keep.double()


def _ref_label_prob(aux, y):
    q = torch.softmax(aux["ref_logits"].double(), -1)
    return q, q[torch.arange(len(y)), y]


def _loss_2026(name, params, p, lpy, py, aux, y):
    if name == "prob_masked":  # (1 - p) * 1[...]
        return _side(py, params) * (1 - py)
    if name == "nll_masked":  # -log p * 1[...]
        return -_side(py, params) * lpy
    if name == "deft":  # a = sum_v p_v^2 (detached), loss = (1 - p^a) / (a + eps)
        a = (p * p).sum(-1)
        return (1 - py ** a) / (a + DEFT_EPS)
    return -_gamma_2026(name, params, p, py, aux, y) * lpy  # PriFT: -m_t log p with m_t from the reference


def _gamma_2026(name, params, p, py, aux, y):
    """gamma of dL/dz = p - (gamma delta_y + (1 - gamma) p), from each loss's derivative."""
    if name == "prob_masked":  # d(1 - p_y)/dz = p_y (p - delta_y)
        return _side(py, params) * py
    if name == "nll_masked":
        return _side(py, params)
    if name == "prift_prob":  # m_t = p_ref(y_t)
        return _ref_label_prob(aux, y)[1]
    if name == "prift_mass":  # m_t = 1[u_t >= tau], u_t = (mass of the tokens strictly less likely than y) + q_y
        q, qy = _ref_label_prob(aux, y)  # under ref; tokens tied with y count once, as y (PriFT's code)
        u = (q * (q < qy.unsqueeze(-1))).sum(-1) + qy
        return (u >= params["tau"]).double()
    if name == "deft":  # d/dz (1 - p^a)/(a + eps) = a/(a + eps) p^a (p - delta_y)
        a = (p * p).sum(-1)
        return a / (a + DEFT_EPS) * py ** a
    raise KeyError(name)


GIFT_EPS = 1e-10  # GIFT's code: torch.log(mixed_ref_probs + 1e-10)


def _gift_target(params, aux, y):
    ref = torch.softmax(aux["ref_logits"].double(), -1)
    V = ref.shape[-1]
    mixed = (1 - params["smooth"]) * ref + params["smooth"] / V
    logits = torch.log(mixed + GIFT_EPS)
    logits[torch.arange(len(y)), y] += params["beta"]
    return torch.softmax(logits, -1)


def _sed_selected(p, params):
    """SED-SFT's mask: the k largest probabilities sum to less than tau."""
    top = torch.sort(p, -1, descending=True).values[:, : params["k"]].sum(-1)
    return (top < params["tau"]).double()


def _talr_weight(py, params):
    """TALR (the DiSC port's talr_loss): w = max(max(p, 1e-6) ** (1 / tau), floor), detached."""
    return torch.clamp(torch.clamp(py, min=1e-6) ** (1 / params["tau"]), min=params["floor"])


def make_case(shape, seed=0, dtype=torch.float32, scale=4.0):
    """Random logits [*shape] with some entries at +-50, labels (a mix of argmax and random ids,
    some ignored), and every auxiliary input."""
    g = torch.Generator().manual_seed(seed)
    *lead, V = shape
    z = torch.randn(shape, generator=g) * scale
    spikes = torch.rand(shape, generator=g) < 0.002
    z = torch.where(spikes, torch.sign(torch.randn(shape, generator=g)) * 50.0, z).clamp(-50, 50)
    y = torch.randint(0, V, tuple(lead), generator=g)
    use_argmax = torch.rand(tuple(lead), generator=g) < 0.4
    y = torch.where(use_argmax, z.argmax(-1), y)
    ignored = torch.rand(tuple(lead), generator=g) < 0.2
    y = torch.where(ignored, torch.full_like(y, -100), y)
    logp_y = torch.log_softmax(z.double(), -1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    # old log-probs around the current ones: ratios spread over both sides of 1 +- eps
    old = (logp_y + torch.randn(tuple(lead), generator=g, dtype=torch.float64) * 0.5).float()
    aux = {
        "teacher_logits": (torch.randn(shape, generator=g) * 3).to(dtype),
        "ref_logits": (z + torch.randn(shape, generator=g)).to(dtype),
        "old_logprobs": old,
        "token_weights": torch.rand(tuple(lead), generator=g),
    }
    return z.to(dtype), y, aux


def flat_supervised(z, y, aux, ignore_index=-100):
    """Flatten to supervised rows: (z [n, V] float64, y [n], aux rows)."""
    V = z.shape[-1]
    m = (y != ignore_index).reshape(-1)
    rows = {}
    for k, v in aux.items():
        rows[k] = v.reshape(-1, V)[m] if v.dim() == z.dim() else v.reshape(-1)[m]
    return z.reshape(-1, V)[m].double(), y.reshape(-1)[m], rows
