"""The gate's run artifact shows, per checkpoint, held-out accuracy, both indicator views and the rule that fired."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import flows.artifacts as artifacts
from ground.schemas import CheckpointEvaluation
from policies.lm.gate import decide_language_model
from policies.promotion import GateRules
from proxyloop.testing import isolated_settings


def _lm_evals(entropy: list[float], mass: list[float], accuracy: list[float]) -> list[CheckpointEvaluation]:
    out = []
    for i, (h, m, a) in enumerate(zip(entropy, mass, accuracy, strict=True)):
        indicators = {"generated/entropy_mean": h, "generated/mass_mean": m,
                      "teacher_forced/entropy_mean": h + 0.5, "teacher_forced/mass_mean": m - 0.1}
        out.append(CheckpointEvaluation(step=10 * (i + 1), path=f"c{i}", heldout_accuracy=a,
                                        topk_entropy=indicators["teacher_forced/entropy_mean"],
                                        topk_mass=indicators["teacher_forced/mass_mean"], indicators=indicators))
    return out


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[dict[str, Any]]]:
    calls: dict[str, list[dict[str, Any]]] = {"table": [], "markdown": [], "image": []}
    monkeypatch.setattr(artifacts, "create_table_artifact", lambda **kw: calls["table"].append(kw))
    monkeypatch.setattr(artifacts, "create_markdown_artifact", lambda **kw: calls["markdown"].append(kw))
    monkeypatch.setattr(artifacts, "create_image_artifact", lambda **kw: calls["image"].append(kw))
    return calls


def test_gate_artifact_has_a_row_per_checkpoint_with_both_views_and_the_rule_that_fired(
    tmp_path: Path, captured: dict[str, list[dict[str, Any]]]
) -> None:
    settings = isolated_settings(tmp_path)  # gate_indicators: advisory (the default)
    # Teacher-forced (the gate's view here) entropy peaks at step 20, then two new lows; mass stays near the base.
    evals = _lm_evals([1.0, 1.4, 1.2, 1.0], [0.9, 0.9, 0.9, 0.9], [0.6, 0.7, 0.75, 0.8])
    decision = decide_language_model(evals, 0.5, GateRules(), base_mass=0.8)
    artifacts.publish_gate_decision(settings, "run-1", decision, evals, base_mass=0.8)

    table = captured["table"][0]["table"]
    assert [r["step"] for r in table] == [10, 20, 30, 40]
    assert table[0]["heldout_accuracy"] == 0.6
    assert table[1]["entropy_generated"] == 1.4 and table[1]["entropy_teacher_forced"] == 1.9
    assert table[1]["mass_generated"] == 0.9 and table[1]["mass_teacher_forced"] == 0.8
    assert table[1]["rule_fired"] == "entropy peak [advisory]"
    assert table[2]["rule_fired"].startswith("entropy new low after the peak")
    assert table[0]["rule_fired"] == ""
    assert [r["picked"] for r in table] == ["", "", "", "yes"]  # advisory: the plain pick, the last checkpoint

    markdown = captured["markdown"][0]["markdown"]
    assert "| step | heldout_accuracy | entropy_generated |" in markdown
    assert "entropy peak [advisory]" in markdown
    assert "/runs/run-1/training.png" in markdown
    assert captured["image"][0]["image_url"].endswith("/runs/run-1/training.png")
    assert (settings.runs_dir / "run-1" / "training.png").stat().st_size > 0


def test_a_mass_collapse_against_the_base_is_named_on_its_checkpoints(
    tmp_path: Path, captured: dict[str, list[dict[str, Any]]]
) -> None:
    settings = isolated_settings(tmp_path)
    evals = _lm_evals([1.0, 1.1, 1.2], [0.9, 0.6, 0.5], [0.7, 0.8, 0.9])  # teacher-forced mass 0.8, 0.5, 0.4
    decision = decide_language_model(evals, 0.5, GateRules(), base_mass=0.8)
    artifacts.publish_gate_decision(settings, "run-2", decision, evals, base_mass=0.8)
    table = captured["table"][0]["table"]
    assert table[0]["rule_fired"] == ""
    assert table[1]["rule_fired"].startswith("mass 0.500 < 0.640 (20% below base)")
    assert table[2]["rule_fired"].startswith("mass 0.400 < 0.640")


def test_feature_policies_show_their_single_view_and_no_rule(
    tmp_path: Path, captured: dict[str, list[dict[str, Any]]]
) -> None:
    settings = isolated_settings(tmp_path)
    evals = [CheckpointEvaluation(step=5, path="p", heldout_accuracy=0.7, topk_entropy=1.2, topk_mass=None)]
    decision = decide_language_model(evals, 0.5, GateRules(indicators="not_applicable"))
    artifacts.publish_gate_decision(settings, "run-3", decision, evals)
    row = captured["table"][0]["table"][0]
    assert row["topk_mass"] == "n/a" and row["rule_fired"] == "n/a (not a language model)"
    assert row["picked"] == "yes"
