"""Bradley–Terry preference learners with a Gaussian prior: the expert-side learners of the text condition tests
(policies/lm/conditions.py, policies/lm/mixture_learners.py) and the text acquisition score's ensemble."""

from __future__ import annotations

import numpy as np


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(-np.logaddexp(0.0, -x))


def fit_bradley_terry(z: np.ndarray, centre: np.ndarray, precision: float) -> np.ndarray:
    """MAP weights w of P(chosen ≻ rejected) = σ(z·w), z [n, p] the pairs' feature differences, under
    the prior N(centre, I/precision): damped Newton steps on a strictly concave objective (no intercept:
    a pair's orientation carries no information)."""

    def objective(w: np.ndarray) -> float:
        return float(log_sigmoid(z @ w).sum() - 0.5 * precision * ((w - centre) ** 2).sum())

    w, value = centre.astype(np.float64).copy(), objective(centre)
    for _ in range(100):
        s = z @ w
        miss, weight = np.exp(log_sigmoid(-s)), np.exp(log_sigmoid(s) + log_sigmoid(-s))
        grad = z.T @ miss - precision * (w - centre)
        step = np.linalg.solve((z * weight[:, None]).T @ z + precision * np.eye(len(w)), grad)
        for _ in range(30):  # halve until the objective rises
            if (new_value := objective(w + step)) >= value:
                break
            step = step / 2
        w, value = w + step, new_value
        if np.abs(step).max(initial=0.0) < 1e-9:
            break
    return w


# Scales a trained plan's held-out margins may be multiplied by (log-spaced): a DPO-trained policy's implicit reward
# ranks pairs but its scale is β's, not the expert's; tuning seeds 0-5 of bench/lm_proxy.py never chose an end.
SCALES = np.exp(np.linspace(np.log(0.02), np.log(3.0), 60))


def calibrated_log_likelihood(margins: np.ndarray) -> np.ndarray:
    """Per-pair log σ(a·m) of held-out margins m at the scale a that fits them best, less 1/n nats per pair: one
    parameter fitted on the pairs it scores (AIC's penalty), so a calibrated plan is not favoured by the fit."""
    fits = log_sigmoid(SCALES[:, None] * np.asarray(margins, dtype=np.float64)[None, :])
    return np.asarray(fits[int(fits.sum(axis=1).argmax())] - 1.0 / len(margins))
