"""What an operator sees on a flow run: tables, Markdown and plots as Prefect artifacts.

Plots are written as PNG into the run's directory and linked through the HTTP app's `/runs`
route, so the Prefect UI shows them without Prefect storing binaries.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: workers and flow runners have no display

import matplotlib.pyplot as plt  # noqa: E402
from prefect.artifacts import (  # noqa: E402
    create_image_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from ground.schemas import CheckpointEvaluation, ConditionReport, GateDecision, ReleaseRecord  # noqa: E402
from ground.settings import Settings  # noqa: E402


def _key(text: str) -> str:
    """Prefect artifact keys: lower-case letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in text.lower())[:60]


def _link(settings: Settings, run_id: str, path: Path) -> str:
    return f"{settings.http_url}/runs/{run_id}/{path.name}"


def conditions_plot(report: ConditionReport, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3))
    names = [c.name for c in report.checks]
    ratios = [c.statistic / c.threshold if c.threshold else c.statistic for c in report.checks]
    ax.barh(names, ratios, color=["tab:green" if c.passed else "tab:red" for c in report.checks])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("statistic / threshold")
    ax.set_title(f"conditions → plan {report.plan}")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def training_plot(curve: list[dict[str, Any]], evals: list[CheckpointEvaluation], out: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
    for stage in sorted({c["stage"] for c in curve}):
        points = [c for c in curve if c["stage"] == stage]
        left.plot([p["step"] for p in points], [p["loss"] for p in points], label=stage)
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.legend()
    left.set_title("training loss")
    steps = [e.step for e in evals]
    right.plot(steps, [e.heldout_accuracy for e in evals], marker="o", label="held-out accuracy")
    right.plot(steps, [e.topk_entropy for e in evals], marker="s", label="top-k entropy (bits)")
    if all(e.topk_mass is not None for e in evals):
        right.plot(steps, [e.topk_mass for e in evals], marker="^", label="top-k mass")
    right.set_xlabel("checkpoint step")
    right.legend(fontsize=7)
    right.set_title("checkpoints")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def publish_condition_report(settings: Settings, run_id: str, report: ConditionReport) -> None:
    run_dir = settings.runs_dir / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "conditions.json").write_text(report.model_dump_json(indent=2))
    plot = conditions_plot(report, run_dir / "conditions.png")
    create_table_artifact(
        key="condition-checks",
        table=[{"check": c.name, "passed": c.passed, "statistic": round(c.statistic, 4),
                "threshold": round(c.threshold, 4), "detail": c.detail} for c in report.checks],
        description=f"Condition tests on snapshot {report.snapshot_id}",
    )
    create_markdown_artifact(
        key="condition-report",
        markdown=f"# Conditions for snapshot `{report.snapshot_id}`\n\n"
        f"{report.n_expert} expert / {report.n_proxy} proxy triples → **plan: {report.plan}**\n\n"
        + "\n".join(f"- {r}" for r in report.reasons)
        + f"\n\n![conditions]({_link(settings, run_id, plot)})\n",
    )
    create_image_artifact(image_url=_link(settings, run_id, plot), key="condition-plot")


def publish_gate_decision(
    settings: Settings, run_id: str, decision: GateDecision, evals: list[CheckpointEvaluation]
) -> None:
    run_dir = settings.runs_dir / run_id
    curve_path = run_dir / "curve.json"
    curve = json.loads(curve_path.read_text()) if curve_path.exists() else []
    plot = training_plot(curve, evals, run_dir / "training.png")
    create_table_artifact(
        key="checkpoint-evaluations",
        table=[{"step": e.step, "heldout_accuracy": round(e.heldout_accuracy, 4),
                "topk_entropy_bits": round(e.topk_entropy, 4),
                "topk_mass": "n/a" if e.topk_mass is None else round(e.topk_mass, 4)} for e in evals],
        description="Held-out expert accuracy and over-optimisation indicators per checkpoint",
    )
    create_markdown_artifact(
        key="gate-decision",
        markdown=f"# Gate: **{decision.decision}**\n\n" + "\n".join(f"- {r}" for r in decision.reasons)
        + f"\n\nBaseline (expert-only) accuracy: {decision.baseline_accuracy:.3f}\n\n"
        f"![training]({_link(settings, run_id, plot)})\n",
    )
    create_image_artifact(image_url=_link(settings, run_id, plot), key="training-plot")


def _serve_line(settings: Settings, release: ReleaseRecord) -> str:
    ref = f"{release.policy}@{release.alias}"
    if release.family == "causal_lm":
        return f"- serve: `POST {settings.http_url}/v1/chat/completions` with `model={ref}`\n"
    return f"- serve: `POST {settings.http_url}/v1/policies/{ref}/predict`\n"


def publish_release(settings: Settings, release: ReleaseRecord) -> None:
    create_markdown_artifact(
        key="release",
        markdown=f"# Released `{release.policy}` v{release.version} as `{release.alias}`\n\n"
        f"- registry path: `{release.path}`\n"
        + _serve_line(settings, release)
        + (f"- **operator override**: {release.override}\n" if release.override else ""),
    )
