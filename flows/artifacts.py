"""What an operator sees on a flow run: tables, Markdown and plots as Prefect artifacts.

Plots are written as PNG into the run's directory and linked through the HTTP app's `/runs`
route, so the Prefect UI shows them without Prefect storing binaries.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from ground.schemas import CheckpointEvaluation, ConditionReport, GateDecision, ReleaseRecord
from ground.settings import Settings

if TYPE_CHECKING:  # the module itself pulls the scorer (torch), which flow modules do not import (test_import_cost)
    from policies.ml_backend import ScoreCache


def _headless() -> None:
    """matplotlib on the headless backend (workers and flow runners have no display). Imported at the first plot,
    not with this module: ~0.5 s that every flow run's start would pay (tests/flows/test_import_cost.py)."""
    import matplotlib

    matplotlib.use("Agg")


_VIEWS = ("generated", "teacher_forced")  # the two indicator views of a language-model checkpoint


def _key(text: str) -> str:
    """Prefect artifact keys: lower-case letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in text.lower())[:60]


def _link(settings: Settings, run_id: str, path: Path) -> str:
    return f"{settings.http_url}/runs/{run_id}/{path.name}"


def conditions_plot(report: ConditionReport, out: Path) -> Path:
    _headless()
    import matplotlib.pyplot as plt

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


def training_plot(curve: list[dict[str, Any]], evals: list[CheckpointEvaluation], out: Path,
                  flags: dict[int, list[str]] | None = None) -> Path:
    """Loss curves; per checkpoint held-out accuracy and the indicators of both views (the gate's view when the
    evaluation has no per-view values), a red line at each checkpoint an indicator rule flagged."""
    _headless()
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
    for stage in sorted({c["stage"] for c in curve}):
        points = [c for c in curve if c["stage"] == stage]
        left.plot([p["step"] for p in points], [p["loss"] for p in points], label=stage)
    left.set_xlabel("step")
    left.set_ylabel("loss")
    if curve:
        left.legend()
    left.set_title("training loss")
    steps = [e.step for e in evals]
    right.plot(steps, [e.heldout_accuracy for e in evals], marker="o", label="held-out accuracy")
    views = [v for v in _VIEWS if evals and all(f"{v}/entropy_mean" in e.indicators for e in evals)]
    for view, style in zip(views, ("-", "--"), strict=False):
        right.plot(steps, [e.indicators[f"{view}/entropy_mean"] for e in evals], style, marker="s",
                   label=f"top-k entropy, {view} (bits)")
        right.plot(steps, [e.indicators[f"{view}/mass_mean"] for e in evals], style, marker="^",
                   label=f"top-k mass, {view}")
    if not views:
        right.plot(steps, [e.topk_entropy for e in evals], marker="s", label="top-k entropy (bits)")
        if all(e.topk_mass is not None for e in evals):
            right.plot(steps, [e.topk_mass for e in evals], marker="^", label="top-k mass")
    for step, fired in (flags or {}).items():
        if fired:
            right.axvline(step, color="tab:red", linewidth=0.8, linestyle=":")
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


def checkpoint_rows(settings: Settings, decision: GateDecision, evals: list[CheckpointEvaluation],
                    base_mass: float | None = None) -> tuple[list[dict[str, Any]], dict[int, list[str]]]:
    """Per checkpoint: held-out accuracy (the gate's gold proxy), both indicator views, the rule that fired there
    (applied or advisory, as the settings' rules judge it) and whether the gate picked it; and the flags by step."""
    from policies.lm.gate import fired_rules  # here: the gate pulls the registry and bus clients
    from policies.promotion import gate_rules

    language_model = bool(evals) and all(f"{_VIEWS[0]}/entropy_mean" in e.indicators for e in evals)
    rules = gate_rules(settings, language_model)
    flags = fired_rules(evals, rules, base_mass)
    picked = decision.checkpoint.step if decision.checkpoint is not None and decision.decision != "block" else None
    rows: list[dict[str, Any]] = []
    for e in evals:
        row: dict[str, Any] = {"step": e.step, "heldout_accuracy": round(e.heldout_accuracy, 4)}
        if language_model:
            for view in _VIEWS:
                row[f"entropy_{view}"] = round(e.indicators.get(f"{view}/entropy_mean", float("nan")), 4)
                row[f"mass_{view}"] = round(e.indicators.get(f"{view}/mass_mean", float("nan")), 4)
        else:
            row["topk_entropy_bits"] = round(e.topk_entropy, 4)
            row["topk_mass"] = "n/a" if e.topk_mass is None else round(e.topk_mass, 4)
        row["rule_fired"] = "; ".join(flags.get(e.step, [])) if language_model else "n/a (not a language model)"
        if language_model and flags.get(e.step):
            row["rule_fired"] += f" [{rules.indicators}]"
        row["picked"] = "yes" if e.step == picked else ""
        rows.append(row)
    return rows, flags


def markdown_table(rows: list[dict[str, Any]], empty: str = "no checkpoints") -> str:
    if not rows:
        return f"_{empty}_"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) or "–" for h in header) + " |" for r in rows]
    return "\n".join(lines)


def publish_gate_decision(
    settings: Settings, run_id: str, decision: GateDecision, evals: list[CheckpointEvaluation],
    base_mass: float | None = None,
) -> None:
    """The gate's decision, a per-checkpoint table (held-out accuracy, both indicator views, the rule that fired)
    and the plot. `base_mass`: the base model's top-k mass (`Evaluation.base_topk_mass`), the mass rule's reference."""
    run_dir = settings.runs_dir / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    curve_path = run_dir / "curve.json"
    curve = json.loads(curve_path.read_text()) if curve_path.exists() else []
    rows, flags = checkpoint_rows(settings, decision, evals, base_mass)
    plot = training_plot(curve, evals, run_dir / "training.png", flags)
    create_table_artifact(
        key="checkpoint-evaluations",
        table=rows,
        description="Held-out expert accuracy, over-optimisation indicators (both views) and the rule that fired, "
        "per checkpoint",
    )
    create_markdown_artifact(
        key="gate-decision",
        markdown=f"# Gate: **{decision.decision}**\n\n" + "\n".join(f"- {r}" for r in decision.reasons)
        + f"\n\nBaseline (expert-only) accuracy: {decision.baseline_accuracy:.3f}\n\n"
        + "## Checkpoints\n\n" + markdown_table(rows) + "\n\n"
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


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), on a sorted list."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def acquisition_queue_rows(cache: ScoreCache, bins: int = 5, top: int = 5) -> dict[str, list[dict[str, Any]]]:
    """The open-task queue as tables: score quantiles, a histogram over [0, log 2] nats (the scores' range), and
    the `top` tasks by score (ties by task id, as Label Studio is served them)."""
    ordered = sorted(t.score for t in cache.tasks.values())
    spread = [{"statistic": name, "score": round(_quantile(ordered, q), 4)} for name, q in
              (("min", 0.0), ("q25", 0.25), ("median", 0.5), ("q75", 0.75), ("max", 1.0))] if ordered else []
    width = math.log(2.0) / bins
    counts = [0] * bins
    for score in ordered:
        counts[min(int(score / width), bins - 1)] += 1
    histogram = [{"scores": f"{i * width:.3f}–{(i + 1) * width:.3f}", "tasks": n,
                  "share": "█" * round(20 * n / max(counts))} for i, n in enumerate(counts)] if ordered else []
    best = sorted(cache.tasks.items(), key=lambda item: (-round(item[1].score, 12), item[0]))[:top]
    top_rows = [{"rank": rank, "task": task_id, "score": round(t.score, 4), "policy prefers": t.preferred,
                 "P(a)": round(t.prob_a, 3)} for rank, (task_id, t) in enumerate(best, start=1)]
    return {"spread": spread, "histogram": histogram, "top": top_rows}


def publish_acquisition_queue(cache: ScoreCache, previous: ScoreCache | None) -> str:
    """The refresh's run page: how many open tasks, how their scores spread, the expert labels that arrived since
    the previous refresh, and the tasks an expert should label first. Returns the Markdown."""
    since = cache.n_labels - previous.n_labels if previous is not None else cache.n_labels
    when = f"since the last refresh ({previous.refreshed_at:%Y-%m-%d %H:%M:%S} UTC)" if previous is not None \
        else "(first refresh)"
    rows = acquisition_queue_rows(cache)
    markdown = (f"# Open-task queue: {len(cache.tasks)} tasks\n\n"
                f"- scored by `{cache.model_version}`, method `{cache.method}`, from {cache.n_labels} expert labels\n"
                f"- expert labels {when}: **{max(since, 0)}**\n\n"
                "## Score distribution (nats; at most log 2 = 0.693)\n\n" + markdown_table(rows["spread"], "no scores")
                + "\n\n" + markdown_table(rows["histogram"], "no scores")
                + "\n\n## Label next\n\n" + markdown_table(rows["top"], "no open tasks") + "\n")
    create_markdown_artifact(key="acquisition-queue", markdown=markdown,
                             description=f"{len(cache.tasks)} open tasks, {max(since, 0)} labels since last refresh")
    return markdown
