"""How much power can any test of "shared level sets" have on the blind judge at 20–300 expert pairs?

    nice .venv/bin/python -m bench.lm_violation_power --quick            # about 3 minutes on 2 CPU cores
    nice .venv/bin/python -m bench.lm_violation_power [--seeds 0 1 2 3 4 5]

Needs `make setup` only (numpy and the generator, ingest/synthetic_judges.py; no model is trained).

Why: bench/lm_proxy.py's shared-level-sets check flags the `blind` judge only at 300 expert pairs. This
bench asks whether detection at 20/50/100 pairs is impossible for *any* test or only for ours.

Null family H0 (a subset of shared level sets): P0(a beats b | x) = sigmoid(w_κ(x) · (φ(a) − φ(b))), one
weight vector per proxy class κ. φ sums to 1 on every (non-empty) response, so w is identified up to a
constant and is fitted in the 4 coordinates w_filler = 0. P0* = the KL projection of the true expert P1 on
H0: per class, unregularised Newton on the cross-entropy between the true p1 and sigmoid(w · Δφ) over
FIT_PAIRS generator pairs. For `relabelled` and `tempered` the expert is in H0 (KL ≈ 0: the control).

Oracle bound (Neyman–Pearson): a level-α test of H0 is level α at P0* ∈ H0, so its power against P1 is at
most that of the likelihood-ratio test of P0* against P1. Prompts, responses and proxy pairs have the same law
under both, so the statistic is Σ_i log p1(y_i)/p0*(y_i) over the n expert labels. Monte Carlo: each
replicate draws n pairs from a pool of generator pairs (`world.pairs`, a seed apart from the fitting pool;
resampling the pool stands in for fresh draws) and labels under P0* (null quantile) and under P1 (power);
ties at the quantile are randomised, so the bound is exact up to Monte-Carlo error (SE: binomial over
the P1 replicates; the null quantile's own error is not included). Any mixture P_π of H0 gives a bound the
same way; `oracle_power` is the smallest of three: P0*, and per-class uniform mixtures over the sharp expert
weight vectors of the class's themes (e_topic / T), without and with P0*. On blind all three are 1.0 at every
n (P0* is 0.35 nats per pair from P1): single-point and these simple mixture bounds cannot show impossibility;
a tight bound needs the least-favourable prior over H0, which is not computed here.

Theme GLRT (knows each prompt's theme, which our LM test does not, but not the alternative): H1' = one weight
vector per theme, H0 = one per proxy class, both L2-penalised (λ = LAMBDA) logistic fits on the n labelled
pairs; statistic 2 (loglik H1' − loglik H0); p-value by parametric bootstrap from the H0 fit; power = share of
datasets with p < α, under P1 (blind) or the true expert (false alarms of relabelled / tempered).

Seeds are world seeds (tuning seeds 0–5 by default). Keys of the last line (one JSON object):
  oracle_power                 {n: mean over seeds} of the oracle bound on blind
  oracle_power_by_seed         {seed: {n: bound}} on blind; oracle_power_se {n: SE of the mean over seeds}
  oracle_size_check            {judge: {n: bound}} for relabelled/tempered: ≈ α since P0* = P1 there
  theme_glrt_power             {n: share of blind datasets rejected, all seeds pooled}
  theme_glrt_false_alarm       {judge: {n: share rejected}} for relabelled/tempered
  kl_projection_nats_per_pair  {judge: mean over seeds of E KL(p1 ‖ p0*) per expert pair}
  ceiling_lm_violation_detected          mean over the four budgets of oracle_power: the most a level-α
                                         condition check can detect on blind (bench/lm_proxy.py's metric)
  achievable_lm_violation_detected_theme_glrt  mean over the four budgets of theme_glrt_power (what a test
                                         that knows themes reaches; its size is not controlled uniformly over H0)
  ceiling_lm_violation_detected_with_outside_image  (ceiling + 1) / 2: the metric also averages
                                         outside_image; this assumes every outside_image run detected
  seeds, replicates ({oracle, glrt_datasets, glrt_bootstrap}), alpha, lambda, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import numpy as np

from ingest.synthetic_judges import THEMES, TOPIC_NAMES, ChatWorld, features, make_world, theme_of

BUDGETS = (20, 50, 100, 300)
ALPHA = 0.05
LAMBDA = 0.01  # GLRT ridge (weights' true scale is 1/T = 20); 0.01 beat 1.0 on blind, tuning seed 1
FIT_PAIRS = 50_000
POOL = {"quick": 100_000, "full": 400_000}
ORACLE_REPS = {"quick": 2000, "full": 10_000}
GLRT_DATASETS = {"quick": 100, "full": 200}
GLRT_BOOT = {"quick": 100, "full": 200}
JUDGES = ("blind", "relabelled", "tempered")
N_CLASSES = len(TOPIC_NAMES) + 1  # proxy classes: the topics and filler
THEME_LIST = tuple(THEMES)


@dataclass(frozen=True)
class Pool:
    """Generator pairs as the expert sees them: theme index and Δφ = φ(a) − φ(b) (5 coordinates)."""

    theme: np.ndarray  # [M] int
    dphi: np.ndarray  # [M, 5]


def draw_pool(world: ChatWorld, n: int, seed: int) -> Pool:
    """n expert pairs as `world.pairs` draws them (responses depend on the seed only, not on the judge)."""
    pairs = world.pairs(n, "expert", seed)
    theme = np.array([THEME_LIST.index(theme_of(p.prompt)) for p in pairs])
    dphi = np.array([np.subtract(features(p.response_a), features(p.response_b)) for p in pairs])
    return Pool(theme, dphi)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)))


def expert_prob(world: ChatWorld, pool: Pool) -> np.ndarray:
    """True P1(a beats b) per pair: Bradley–Terry on the expert topic's share at the expert temperature."""
    topic = np.array([TOPIC_NAMES.index(THEMES[t]) for t in THEME_LIST])[pool.theme]
    gap = pool.dphi[np.arange(len(topic)), topic] / world.expert_temperature
    return sigmoid(gap)


def proxy_class(world: ChatWorld, pool: Pool) -> np.ndarray:
    return np.asarray(world.proxy_classes)[pool.theme]


def fit_projection(world: ChatWorld, pool: Pool, p1: np.ndarray, iters: int = 100) -> np.ndarray:
    """P0*: per proxy class, argmin_w of the cross-entropy of sigmoid(w·Δφ[:4]) against p1 (Newton with
    backtracking, unregularised). Returns W [N_CLASSES, 4] (rows of unused classes are 0)."""
    cls, x = proxy_class(world, pool), pool.dphi[:, :4]
    weights = np.zeros((N_CLASSES, 4))
    for k in range(N_CLASSES):
        xs, ps = x[cls == k], p1[cls == k]
        if not len(xs):
            continue
        w: np.ndarray = np.zeros(4)

        def loss(v: np.ndarray, xs: np.ndarray = xs, ps: np.ndarray = ps) -> float:
            m = xs @ v
            return float(np.mean(np.logaddexp(0.0, m) - ps * m))

        for _ in range(iters):
            q = sigmoid(xs @ w)
            grad = xs.T @ (q - ps) / len(xs)
            hess = (xs * (q * (1 - q))[:, None]).T @ xs / len(xs) + 1e-12 * np.eye(4)
            step, t, before = np.linalg.solve(hess, grad), 1.0, loss(w)
            while loss(w - t * step) > before + 1e-15 and t > 1e-6:
                t /= 2
            w = w - t * step
            if np.max(np.abs(t * step)) < 1e-10:
                break
        weights[k] = w
    return weights


def null_prob(world: ChatWorld, pool: Pool, weights: np.ndarray) -> np.ndarray:
    return sigmoid(np.einsum("ij,ij->i", pool.dphi[:, :4], weights[proxy_class(world, pool)]))


def kl_per_pair(p1: np.ndarray, p0: np.ndarray) -> float:
    eps = 1e-300
    kl = p1 * (np.log(p1 + eps) - np.log(p0 + eps)) + (1 - p1) * (np.log(1 - p1 + eps) - np.log(1 - p0 + eps))
    return float(np.mean(kl))


def _llr(p1: np.ndarray, p0: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Σ_i log p1(y_i)/p0(y_i) per row; y = 1 when a wins."""
    lp1, lq1 = np.log(np.clip(p1, 1e-300, 1)), np.log(np.clip(1 - p1, 1e-300, 1))
    lp0, lq0 = np.log(np.clip(p0, 1e-300, 1)), np.log(np.clip(1 - p0, 1e-300, 1))
    return np.asarray(np.round(np.sum(np.where(y, lp1 - lp0, lq1 - lq0), axis=1), 8))


def oracle_power(p1: np.ndarray, p0: np.ndarray, n: int, reps: int, rng: np.random.Generator,
                 alpha: float = ALPHA) -> tuple[float, float]:
    """Power (and binomial SE) of the randomised Neyman–Pearson test of P0* against P1 on n pairs."""
    s0 = _llr(*_draw(p1, p0, n, reps, rng, under_null=True))
    s1 = _llr(*_draw(p1, p0, n, reps, rng, under_null=False))
    return _np_power(s0, s1, alpha)


def _draw(p1: np.ndarray, p0: np.ndarray, n: int, reps: int, rng: np.random.Generator,
          under_null: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = rng.integers(0, len(p1), size=(reps, n))
    a, b = p1[idx], p0[idx]
    return a, b, rng.random((reps, n)) < (b if under_null else a)


def expert_components(world: ChatWorld, projection: np.ndarray | None = None) -> np.ndarray:
    """Prior points for a mixture null: component m gives proxy class k the expert's weights (e_topic / T) of
    the m-th theme in class k (repeating when a class has fewer themes), optionally the projection as the last.
    Returns [M, N_CLASSES, 4]; every component lies in H0."""
    members: list[list[int]] = [[] for _ in range(N_CLASSES)]
    for t, k in enumerate(world.proxy_classes):
        members[k].append(TOPIC_NAMES.index(THEMES[THEME_LIST[t]]))
    size = max(len(m) for m in members)
    comps = np.zeros((size + (projection is not None), N_CLASSES, 4))
    for k, topics in enumerate(members):
        for m in range(size):
            if topics:
                comps[m, k, topics[m % len(topics)]] = 1.0 / world.expert_temperature
    if projection is not None:
        comps[-1] = projection
    return comps


def mixture_power(world: ChatWorld, pool: Pool, p1: np.ndarray, comps: np.ndarray, n: int, reps: int,
                  rng: np.random.Generator, alpha: float = ALPHA) -> tuple[float, float]:
    """Power bound from a mixture null: class by class, an independent uniform draw of one of `comps`' rows,
    then Bradley–Terry labels from it. Any mixture of H0 gives a valid bound (Neyman–Pearson on P_π vs P1)."""
    classes = np.asarray(world.proxy_classes)

    def stats(under_null: bool) -> np.ndarray:
        idx = rng.integers(0, len(p1), size=(reps, n))
        x, cls = pool.dphi[idx, :4], classes[pool.theme[idx]]
        probs = sigmoid(np.einsum("rnd,mrnd->mrn", x, comps[:, cls]))  # [M, reps, n]
        if under_null:
            pick = rng.integers(0, len(comps), size=(reps, N_CLASSES))
            p_true = np.take_along_axis(probs, pick[np.arange(reps)[:, None], cls][None], axis=0)[0]
        else:
            p_true = p1[idx]
        y = rng.random((reps, n)) < p_true
        onehot = np.eye(N_CLASSES)[cls]  # [reps, n, K]
        log_comp = np.log(np.clip(np.where(y, probs, 1 - probs), 1e-300, 1))
        per_class = np.einsum("mrn,rnk->mrk", log_comp, onehot)
        log_null = np.sum(np.logaddexp.reduce(per_class, axis=0) - np.log(len(comps)), axis=1)
        log_p1 = np.sum(np.log(np.clip(np.where(y, p1[idx], 1 - p1[idx]), 1e-300, 1)), axis=1)
        return np.asarray(np.round(log_p1 - log_null, 8))

    return _np_power(stats(True), stats(False), alpha)


def _np_power(s0: np.ndarray, s1: np.ndarray, alpha: float) -> tuple[float, float]:
    """Power and binomial SE of the randomised test rejecting for large statistic at level alpha under s0."""
    c = np.sort(s0)[::-1][int(alpha * len(s0))]
    above, at = np.mean(s0 > c), np.mean(s0 == c)
    gamma = (alpha - above) / at if at > 0 else 0.0
    power = float(np.mean(s1 > c) + gamma * np.mean(s1 == c))
    return power, float(np.sqrt(max(power * (1 - power), 1e-12) / len(s1)))


def tightest_bound(world: ChatWorld, pool: Pool, p1: np.ndarray, p0: np.ndarray, weights: np.ndarray, n: int,
                   reps: int, rng: np.random.Generator) -> tuple[float, float]:
    """The smallest of three valid power bounds: the point P0* and two mixture nulls (expert-like components,
    without and with P0*). Each is an upper bound on any level-ALPHA test's power, so the minimum is too."""
    bounds = [oracle_power(p1, p0, n, reps, rng),
              mixture_power(world, pool, p1, expert_components(world), n, reps, rng),
              mixture_power(world, pool, p1, expert_components(world, weights), n, reps, rng)]
    return min(bounds)


def fit_grouped(x: np.ndarray, group: np.ndarray, y: np.ndarray, n_groups: int, lam: float = LAMBDA,
                iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Ridge logistic fits, one 4-vector per group, batched: x [R, n, 4], group [R, n], y [R, B, n] (0/1).
    Returns (unpenalised log-likelihood [R, B], fitted margins [R, B, n]). Newton with per-group halving."""
    r, n, d = x.shape
    onehot = np.zeros((r, n, n_groups))
    np.put_along_axis(onehot, group[..., None], 1.0, axis=2)
    z = (onehot[..., None] * x[:, :, None, :]).reshape(r, n, n_groups * d)
    zz = (onehot[..., None, None] * (x[:, :, :, None] * x[:, :, None, :])[:, :, None]).reshape(r, n, -1)
    theta = np.zeros((r, y.shape[1], n_groups * d))
    eye = lam * np.eye(d)

    def objective(th: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = th @ z.transpose(0, 2, 1)
        nll = np.logaddexp(0.0, m) - y * m
        pen = 0.5 * lam * np.sum(th.reshape(*th.shape[:2], n_groups, d) ** 2, axis=-1)
        return nll @ onehot + pen, m

    obj, m = objective(theta)
    for _ in range(iters):
        p = sigmoid(m)
        grad = (y - p) @ z - lam * theta
        hess = ((p * (1 - p)) @ zz).reshape(*theta.shape[:2], n_groups, d, d) + eye
        step = np.linalg.solve(hess, grad.reshape(*theta.shape[:2], n_groups, d, 1))[..., 0]
        t = np.ones(obj.shape)
        for _ in range(8):
            new_obj, _ = objective(theta + (t[..., None] * step).reshape(theta.shape))
            worse = new_obj > obj + 1e-12
            if not worse.any():
                break
            t = np.where(worse, t / 2, t)
        theta = theta + (t[..., None] * step).reshape(theta.shape)
        obj, m = objective(theta)
        if np.max(np.abs(t[..., None] * step)) < 1e-6:
            break
    loglik = -np.sum(np.logaddexp(0.0, m) - y * m, axis=-1)
    return loglik, m


def glrt_power(world: ChatWorld, pool: Pool, p_true: np.ndarray, n: int, datasets: int, boot: int,
               rng: np.random.Generator, chunk: int = 25) -> float:
    """Share of datasets (n pairs, labels from p_true) where the theme GLRT's bootstrap p-value is < ALPHA."""
    rejected = 0
    classes = np.asarray(world.proxy_classes)
    for start in range(0, datasets, chunk):
        r = min(chunk, datasets - start)
        idx = rng.integers(0, len(p_true), size=(r, n))
        x, theme = pool.dphi[idx, :4], pool.theme[idx]
        y = (rng.random((r, 1, n)) < p_true[idx][:, None]).astype(float)
        ll0, m0 = fit_grouped(x, classes[theme], y, N_CLASSES)
        ll1, _ = fit_grouped(x, theme, y, len(THEME_LIST))
        stat = 2 * (ll1 - ll0)[:, 0]
        y_boot = (rng.random((r, boot, n)) < sigmoid(m0)).astype(float)
        b0, _ = fit_grouped(x, classes[theme], y_boot, N_CLASSES)
        b1, _ = fit_grouped(x, theme, y_boot, len(THEME_LIST))
        p_value = (1 + np.sum(2 * (b1 - b0) >= stat[:, None] - 1e-9, axis=1)) / (boot + 1)
        rejected += int(np.sum(p_value < ALPHA))
    return rejected / datasets


def _mean(values: list[float]) -> float:
    return round(float(np.mean(values)), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer replicates and bootstrap draws")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(6)), help="world seeds (tuning 0-5)")
    parser.add_argument("--no-glrt", action="store_true", help="oracle bound only")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    reps, datasets, boot = ORACLE_REPS[mode], GLRT_DATASETS[mode], GLRT_BOOT[mode]
    started = time.time()
    # Responses depend on the pairs' seed only (ChatWorld.pairs), so one pool serves every judge and world.
    fit_pool, pool = draw_pool(make_world(0, "blind"), FIT_PAIRS, 1), draw_pool(make_world(0, "blind"), POOL[mode], 2)
    print(f"pools: {FIT_PAIRS} fitting, {POOL[mode]} Monte-Carlo pairs ({time.time() - started:.0f} s)", flush=True)
    oracle: dict[str, dict[int, dict[int, tuple[float, float]]]] = {j: {} for j in JUDGES}
    glrt: dict[str, dict[int, list[float]]] = {j: {n: [] for n in BUDGETS} for j in JUDGES}
    kl: dict[str, list[float]] = {j: [] for j in JUDGES}
    for judge in JUDGES:
        for seed in args.seeds:
            world = make_world(seed, judge)
            rng = np.random.default_rng([seed, JUDGES.index(judge)])
            weights = fit_projection(world, fit_pool, expert_prob(world, fit_pool))
            p1, p0 = expert_prob(world, pool), null_prob(world, pool, weights)
            kl[judge].append(kl_per_pair(p1, p0))
            oracle[judge][seed] = {n: tightest_bound(world, pool, p1, p0, weights, n, reps, rng) for n in BUDGETS}
            line = " ".join(f"{n}: {p:.3f}±{se:.3f}" for n, (p, se) in oracle[judge][seed].items())
            print(f"{judge:10s} seed {seed}  KL {kl[judge][-1]:.4f} nats/pair  oracle {line}", end="", flush=True)
            if not args.no_glrt:
                for n in BUDGETS:
                    glrt[judge][n].append(glrt_power(world, pool, p1, n, datasets, boot, rng))
                print("  glrt " + " ".join(f"{n}: {glrt[judge][n][-1]:.3f}" for n in BUDGETS), end="", flush=True)
            print(f"  ({time.time() - started:.0f} s)", flush=True)
    by_seed = {s: {n: round(v[0], 4) for n, v in oracle["blind"][s].items()} for s in args.seeds}
    power = {n: _mean([oracle["blind"][s][n][0] for s in args.seeds]) for n in BUDGETS}
    se = {n: round(float(np.sqrt(sum(oracle["blind"][s][n][1] ** 2 for s in args.seeds))) / len(args.seeds), 4)
          for n in BUDGETS}
    ceiling = float(np.mean(list(power.values())))
    print("\nn    oracle bound (blind)   theme GLRT blind   false alarms relabelled / tempered   oracle size rel/temp")
    for n in BUDGETS:
        fa = " / ".join(f"{_mean(glrt[j][n]) if glrt[j][n] else float('nan'):.3f}" for j in SATISFYING_JUDGES)
        size = " / ".join(f"{_mean([oracle[j][s][n][0] for s in args.seeds]):.3f}" for j in SATISFYING_JUDGES)
        g = _mean(glrt["blind"][n]) if glrt["blind"][n] else float("nan")
        print(f"{n:<4} {power[n]:.3f} ± {se[n]:.3f}          {g:.3f}              {fa}                        {size}")
    result = {
        "oracle_power": power,
        "oracle_power_se": se,
        "oracle_power_by_seed": by_seed,
        "theme_glrt_power": {n: _mean(glrt["blind"][n]) for n in BUDGETS} if not args.no_glrt else None,
        "theme_glrt_false_alarm": {j: {n: _mean(glrt[j][n]) for n in BUDGETS} for j in SATISFYING_JUDGES}
        if not args.no_glrt else None,
        "oracle_size_check": {j: {n: _mean([oracle[j][s][n][0] for s in args.seeds]) for n in BUDGETS}
                              for j in SATISFYING_JUDGES},
        "kl_projection_nats_per_pair": {j: round(abs(float(np.mean(kl[j]))), 6) for j in JUDGES},
        "ceiling_lm_violation_detected": round(ceiling, 4),
        "achievable_lm_violation_detected_theme_glrt": _mean([float(np.mean(glrt["blind"][n])) for n in BUDGETS])
        if not args.no_glrt else None,
        "ceiling_lm_violation_detected_with_outside_image": round((ceiling + 1) / 2, 4),
        "seeds": args.seeds,
        "replicates": {"oracle": reps, "glrt_datasets": datasets, "glrt_bootstrap": boot},
        "alpha": ALPHA,
        "lambda": LAMBDA,
        "seconds": round(time.time() - started, 1),
    }
    sys.stdout.flush()
    print(json.dumps(result))


SATISFYING_JUDGES = ("relabelled", "tempered")

if __name__ == "__main__":
    main()
