"""bench/gate_chance.py's own arithmetic: the noise judge and the summary's rates."""

from __future__ import annotations

import pytest

from bench.gate_chance import noisy, summarise
from ground.schemas import FeatureTriple


def test_the_noise_judge_swaps_winner_and_loser_by_a_coin_and_keeps_the_inputs():
    proxy = [FeatureTriple(x=[float(i)], y_w=0, y_l=1) for i in range(2000)]
    swapped = noisy(proxy, seed=3)
    assert [t.x for t in swapped] == [t.x for t in proxy]
    assert {(t.y_w, t.y_l) for t in swapped} == {(0, 1), (1, 0)}
    assert 0.45 < sum(t.y_w == 1 for t in swapped) / 2000 < 0.55
    assert noisy(proxy, seed=3) == swapped


def _run(seed: int, baseline: float, tested: float, released: tuple[bool, bool]) -> dict[str, object]:
    return {"seed": seed, "baseline": baseline, "tested": tested,
            "released": {"baseline": released[0], "tested": released[1]}}


def test_the_summary_counts_chance_level_releases_blocked_good_ones_and_the_paired_gain():
    runs = [_run(0, 0.52, 0.5, (True, False)),  # a chance-level release the test stops
            _run(0, 0.9, 0.5, (True, False)),  # a good release it blocks
            _run(1, 0.8, 0.8, (True, True)),
            _run(1, 0.5, 0.5, (False, False))]
    out = summarise(runs)
    assert out["chance_level_release_rate"] == {"baseline": 0.25, "tested": 0.0}
    assert (out["good_release_blocked_rate"], out["good_releases"]) == (0.5, 2)
    assert out["served_accuracy_gain"] == pytest.approx(((0.5 - 0.52 + 0.5 - 0.9) / 2 + 0) / 2)
