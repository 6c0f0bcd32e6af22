"""Label Studio's annotation JSON → `ExpertLabel` events: the models of what we read, and the conversion.

Shared by the webhook (webhook.py) and reconciliation (reconcile.py), so one annotation gets the same
event id (`labelstudio-annotation-{id}`) and the same `occurred_at` whichever path delivered it; the
store's idempotent upsert then keeps exactly one row.

Each event names where it came from (`source`, kept in the store): the project, `labelstudio/project-{id}`, so
reconciling one project withdraws none of another's labels; `labelstudio/simulated` for payloads made up without a
Label Studio (`webhook_payload(simulated=True)`, the demo's), which no project's reconciliation takes for its own.

Two kinds of refusal: `NoLabel`, an annotation that carries no preference (a skip, a cleared or
ambiguous choice): an edit to one retracts the label it had; and any other `UnusableAnnotation`
(a task without what the label needs), which is refused with its reason.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from ground.moments import as_utc, utcnow
from ground.schemas import ExpertLabel, FeatureTriple, Item, PairwiseText
from ground.schemas.events import LABELSTUDIO_SOURCE

EVENT_ID_PREFIX = "labelstudio-annotation-"
_ANNOTATION_ID = re.compile(r"-?[0-9]+")  # ASCII digits only: int() also takes "١", "1_0" and " 7"
# Who a label is from when Label Studio names nobody: deleting a user sets its annotations' completed_by
# to null (on_delete=SET_NULL). The id is stored as the label's source and keys the annotator's profile
# (policies/profile.py), so it must be a valid, recognisable user id rather than "labelstudio-user-None".
UNKNOWN_ANNOTATOR = "labelstudio-user-unknown"
# A pairwise result in provision.PAIRWISE_CONFIG. Label Studio's editor writes a <Pairwise> result with
# to_name equal to the tag's own name ("pw"), not its toName ("a,b"), and only renders a prediction
# written that way: with "a,b" the suggestion was stored but neither response showed as selected.
# The conversion below reads only the result's type and value, so either name converts alike.
PAIRWISE_FROM_NAME, PAIRWISE_TO_NAME = "pw", "pw"
# What a task's data must hold (provision.PAIRWISE_CONFIG shows the text ones); a task with "x" is a feature task.
TEXT_TASK_FIELDS = ("prompt", "answer_a", "answer_b")
FEATURE_TASK_FIELDS = ("x", "y_a", "y_b")
PROJECT_SOURCE_PREFIX = "labelstudio/project-"
# No Label Studio project has this source: payloads carrying SIMULATED_KEY (the demo's, posted without a Label
# Studio) record it, so enabling a real Label Studio later, whose project 1 lacks their annotations, retracts none.
SIMULATED_SOURCE = "labelstudio/simulated"
SIMULATED_KEY = "proxyloop_simulated"


class LSModel(BaseModel):
    """Label Studio sends more than we read, and adds fields between versions: the rest is kept, not refused."""

    model_config = ConfigDict(extra="allow")


class LSResult(LSModel):
    from_name: str
    to_name: str | None = None
    type: str
    value: dict[str, Any]


class LSAnnotation(LSModel):
    id: int
    result: list[LSResult]
    completed_by: int | dict[str, Any] | None = None
    updated_at: datetime | None = None
    task: int | None = None
    was_cancelled: bool = False

    @field_validator("result", mode="before")
    @classmethod
    def _null_result_is_empty(cls, value: object) -> object:
        """Label Studio's Annotation.result is nullable (a skip created through the API has none): null is
        no result, the same as [], not a malformed annotation that would stop reconciliation."""
        return [] if value is None else value


class LSTask(LSModel):
    id: int
    data: dict[str, Any]


class UnusableAnnotation(ValueError):
    """An annotation that cannot become a label; the message says why."""


class NoLabel(UnusableAnnotation):
    """The annotation holds no preference (skipped, no choice, or choices that disagree): nothing to store,
    and a label it held before is withdrawn."""


def event_id_for(annotation_id: int) -> str:
    return f"{EVENT_ID_PREFIX}{annotation_id}"


def annotation_id_of(event_id: str) -> int | None:
    """The annotation id in an event id `event_id_for` made; None for any other. The store keeps the event ids any
    client sent (a proxy or Kafka producer may use the prefix): int() of the rest raised on a suffix that is no
    number, stopping every reconciliation, and read "…-1_0" or "…-07" as annotation 10 or 7, whose event ids differ."""
    number = event_id.removeprefix(EVENT_ID_PREFIX)
    if number == event_id or not _ANNOTATION_ID.fullmatch(number):
        return None
    annotation_id = int(number)
    return annotation_id if event_id_for(annotation_id) == event_id else None


def project_source(project_id: int) -> str:
    """The source of a project's labels: reconcile sweeps only the live labels recorded with it."""
    return f"{PROJECT_SOURCE_PREFIX}{project_id}"


def project_of_source(source: str | None) -> int | None:
    """The project a recorded source names; None for the simulated, the default and any other source."""
    number = source.removeprefix(PROJECT_SOURCE_PREFIX) if source else ""
    return int(number) if source != number and number.isascii() and number.isdigit() else None


def source_of_webhook(payload: dict[str, Any]) -> str:
    """The source of a webhook's labels: simulated when marked so; else the project Label Studio names (it adds the
    project to every payload of a webhook with send_payload, as setup registers it); else the contract's default."""
    if payload.get(SIMULATED_KEY) is True:
        return SIMULATED_SOURCE
    project = payload.get("project")
    project_id = project.get("id") if isinstance(project, dict) else project
    if isinstance(project_id, int) and not isinstance(project_id, bool) and project_id > 0:
        return project_source(project_id)
    return LABELSTUDIO_SOURCE


def _choice(annotation: LSAnnotation) -> Literal["a", "b"]:
    # Checked first: Label Studio's `was_cancelled` means "User skipped the task" (its Annotation model), and a
    # skip submits whatever the editor held, a pairwise click included. The annotator declined to judge: no label.
    if annotation.was_cancelled:
        raise NoLabel(f"annotation {annotation.id} was skipped by the annotator; it carries no label")
    selected = [result.value.get("selected") for result in annotation.result if result.type == "pairwise"]
    if not selected:
        raise NoLabel("annotation has no pairwise result; is the project's labelling config pairwise?")
    # Several pairwise results (regions) must agree: taking the first would store a choice the annotator
    # also contradicted.
    if len(set(map(repr, selected))) > 1:
        raise NoLabel(f"annotation {annotation.id} has pairwise results that disagree ({selected!r}); "
                      "it carries no one choice")
    if selected[0] not in ("left", "right"):
        raise NoLabel(f"pairwise result has selected={selected[0]!r}; expected 'left' or 'right'")
    return "a" if selected[0] == "left" else "b"


def _rationale(annotation: LSAnnotation) -> str | None:
    """A TextArea's text: Label Studio sends a list of lines; a client that sends one string must not get it
    back as one character per line."""
    for result in annotation.result:
        text = result.value.get("text") if result.type == "textarea" else None
        if isinstance(text, str) and text:
            return text
        if isinstance(text, list) and text:
            return "\n".join(str(line) for line in text)
    return None


def _output_id(data: dict[str, Any], name: str) -> int:
    """An output id as an int. A float is taken only when integral (1.0, never 1.7: truncating would store
    a comparison the annotator never saw); a bool is refused though Python counts it an int; a string of
    an integer is taken, as a CSV import into Label Studio gives one (flows.acquisition reads it alike)."""
    value = data.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    found = "is missing" if name not in data else f"is {value!r}"
    raise UnusableAnnotation(f"task data {name!r} {found}; a feature task (one with 'x') needs integer output ids "
                             f"{', '.join(map(repr, FEATURE_TASK_FIELDS[1:]))}")


def _text_field(data: dict[str, Any], name: str) -> str | None:
    """What is wrong with one text field, or None when it is a non-empty string."""
    value = data.get(name)
    if name not in data or value is None:
        return f"{name!r} is missing"
    if not isinstance(value, str):
        return f"{name!r} is not a string ({type(value).__name__})"
    return None if value.strip() else f"{name!r} is empty"


def _item(task: LSTask, choice: Literal["a", "b"], rationale: str | None) -> Item:
    """The labelled item; a task missing what the label needs is refused, never stored with blanks or guesses."""
    data = task.data
    if "x" in data:
        # Paper 1's feature setting: the task carries x and the output ids behind each answer.
        y_a, y_b = _output_id(data, "y_a"), _output_id(data, "y_b")
        y_w, y_l = (y_a, y_b) if choice == "a" else (y_b, y_a)
        return FeatureTriple(x=data["x"], y_w=y_w, y_l=y_l)
    problems = [p for p in (_text_field(data, name) for name in TEXT_TASK_FIELDS) if p]
    if problems:
        text, feature = (", ".join(map(repr, fields)) for fields in (TEXT_TASK_FIELDS, FEATURE_TASK_FIELDS))
        raise UnusableAnnotation(f"task {task.id}: {'; '.join(problems)}. A text task needs non-empty {text} "
                                 f"(a feature task: {feature}); its data has {sorted(data)}")
    return PairwiseText(
        prompt=data["prompt"], response_a=data["answer_a"], response_b=data["answer_b"], choice=choice,
        rationale=rationale,
    )


def annotator_of(completed_by: int | dict[str, Any] | None) -> str:
    """The label's annotator: Label Studio's user id, or UNKNOWN_ANNOTATOR when the user was deleted."""
    annotator = completed_by.get("id") if isinstance(completed_by, dict) else completed_by
    if isinstance(annotator, bool) or not isinstance(annotator, int | str) or str(annotator).strip() == "":
        return UNKNOWN_ANNOTATOR
    return f"labelstudio-user-{annotator}"


def _stamp(annotation: LSAnnotation) -> datetime:
    # Label Studio sends UTC ("...Z"); a naive time (an older server, a hand-made payload) is read as UTC
    # rather than refused by the contract, which takes only times with a zone.
    return as_utc(annotation.updated_at) if annotation.updated_at else utcnow()


def expert_label_from_annotation(
    annotation: LSAnnotation, task: LSTask, action: Literal["created", "updated"] = "created",
    source: str = LABELSTUDIO_SOURCE,
) -> ExpertLabel:
    """One annotation (from a webhook or the API) as an event; raises UnusableAnnotation (NoLabel for an
    annotation that holds no preference) with the reason. `source`: its project's (`project_source`)."""
    return ExpertLabel(
        event_id=event_id_for(annotation.id),
        annotator_id=annotator_of(annotation.completed_by),
        action=action,
        occurred_at=_stamp(annotation),
        item=_item(task, _choice(annotation), _rationale(annotation)),
        source=source,
    )


def retraction(
    annotation_id: int, annotator: int | dict[str, Any] | None = None, occurred_at: datetime | None = None,
    source: str = LABELSTUDIO_SOURCE,
) -> ExpertLabel:
    """The event that retracts an annotation's label. A deletion is stamped now, so it wins over any older copy;
    an annotation edited into holding no label is stamped with its own `updated_at` (`retraction_of`). The default
    source names no project: the store then keeps the project the label recorded."""
    return ExpertLabel(event_id=event_id_for(annotation_id), annotator_id=annotator_of(annotator), action="deleted",
                       occurred_at=as_utc(occurred_at) if occurred_at else utcnow(), source=source)


def retraction_of(annotation: LSAnnotation, source: str = LABELSTUDIO_SOURCE) -> ExpertLabel:
    """The retraction of an annotation that no longer holds a label, stamped with its `updated_at`: it outranks
    the label it withdraws (stamped with an earlier `updated_at`) and loses to a later edit that restores one,
    whichever arrives first, and the webhook and reconciliation send the same event."""
    return retraction(annotation.id, annotation.completed_by, _stamp(annotation), source)


def webhook_payload(
    task_id: int, annotation_id: int, data: dict[str, Any], selected: Literal["left", "right"],
    annotator: int = 1, project_id: int = 1, action: str = "ANNOTATION_CREATED", simulated: bool = False,
) -> dict[str, Any]:
    """What Label Studio 1.23 POSTs for ANNOTATION_CREATED (fields we do not read trimmed). `simulated`: made up
    without a Label Studio, marked (SIMULATED_KEY) so its label records a source no project has (SIMULATED_SOURCE)."""
    now = utcnow().isoformat()
    return {
        **({SIMULATED_KEY: True} if simulated else {}),
        "action": action,
        "annotation": {
            "id": annotation_id,
            "result": [{"from_name": PAIRWISE_FROM_NAME, "to_name": PAIRWISE_TO_NAME, "type": "pairwise",
                        "origin": "manual",
                        "value": {"selected": selected}}],
            "completed_by": annotator, "created_at": now, "updated_at": now, "task": task_id,
            "project": project_id, "was_cancelled": False, "ground_truth": False, "lead_time": 3.2,
        },
        "project": {"id": project_id, "title": "proxyloop pairwise"},
        "task": {"id": task_id, "data": dict(data), "project": project_id, "is_labeled": True},  # a copy: edits stay
    }
