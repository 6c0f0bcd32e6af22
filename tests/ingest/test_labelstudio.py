import pytest
from pydantic import ValidationError

from ground.schemas import FeatureTriple, PairwiseText
from ingest.labelstudio import UnusableAnnotation, expert_label_from_webhook, webhook_payload


def test_feature_task_left_choice_prefers_answer_a():
    payload = webhook_payload(task_id=3, annotation_id=11, data={"x": [0.5, 1.0], "y_a": 0, "y_b": 2},
                              selected="left", annotator=7)
    label = expert_label_from_webhook(payload)
    assert label.event_id == "labelstudio-annotation-11"
    assert label.annotator_id == "labelstudio-user-7"
    assert label.item == FeatureTriple(x=[0.5, 1.0], y_w=0, y_l=2)


def test_feature_task_right_choice_prefers_answer_b():
    payload = webhook_payload(task_id=3, annotation_id=11, data={"x": [0.5], "y_a": 0, "y_b": 2}, selected="right")
    assert expert_label_from_webhook(payload).item == FeatureTriple(x=[0.5], y_w=2, y_l=0)


@pytest.mark.parametrize("text, rationale", [
    (["B is correct"], "B is correct"),
    (["B is correct", "Lyon is not"], "B is correct\nLyon is not"),
    ("B is correct", "B is correct"),  # one string, not Label Studio's list: not one character per line
])
def test_text_task_becomes_pairwise_text_with_rationale(text, rationale):
    payload = webhook_payload(task_id=1, annotation_id=2, selected="right",
                              data={"prompt": "Capital of France?", "answer_a": "Lyon", "answer_b": "Paris"})
    payload["annotation"]["result"].append({"from_name": "why", "to_name": "a", "type": "textarea",
                                            "value": {"text": text}})
    item = expert_label_from_webhook(payload).item
    assert isinstance(item, PairwiseText)
    assert (item.choice, item.response_b, item.rationale) == ("b", "Paris", rationale)


def test_update_action_keeps_the_event_id():
    payload = webhook_payload(1, 5, {"x": [1.0], "y_a": 0, "y_b": 1}, "left", action="ANNOTATION_UPDATED")
    label = expert_label_from_webhook(payload)
    assert (label.event_id, label.action) == ("labelstudio-annotation-5", "updated")


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.update(action="PROJECT_CREATED"), "not handled"),
    (lambda p: p["annotation"].update(result=[]), "no pairwise result"),
    (lambda p: p["annotation"]["result"][0]["value"].update(selected="up"), "expected 'left' or 'right'"),
    (lambda p: p["task"]["data"].pop("y_b"), "y_a"),
    (lambda p: p["task"]["data"].update(y_a=1.7), "'y_a' is 1.7"),  # was truncated to output 1
    (lambda p: p["task"]["data"].update(y_b=False), "'y_b' is False"),
    (lambda p: p["task"].update(data={"prompt": "p", "response_a": "A", "response_b": "B"}),
     "'answer_a' is missing; 'answer_b' is missing"),  # was stored with two empty responses
    (lambda p: p.update(action="TASKS_CREATED", annotation=None), "'TASKS_CREATED' is not handled"),
])
def test_unusable_payloads_are_refused_with_a_reason(mutate, message):
    payload = webhook_payload(1, 5, {"x": [1.0], "y_a": 0, "y_b": 1}, "left")
    mutate(payload)
    with pytest.raises(UnusableAnnotation, match=message):
        expert_label_from_webhook(payload)


def test_payload_without_annotation_fails_validation():
    with pytest.raises(ValidationError):
        expert_label_from_webhook({"action": "ANNOTATION_CREATED"})


def test_deletion_webhook_retracts_every_named_annotation():
    from ingest.labelstudio import expert_labels_from_webhook

    labels = expert_labels_from_webhook({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 4}, {"id": 9}],
                                         "project": {"id": 1}})
    assert [(label.event_id, label.action, label.item) for label in labels] == [
        ("labelstudio-annotation-4", "deleted", None), ("labelstudio-annotation-9", "deleted", None)]


def test_skipped_annotation_is_refused_with_a_reason():
    payload = webhook_payload(1, 5, {"prompt": "p", "answer_a": "a", "answer_b": "b"}, "left")
    payload["annotation"].update(result=[], was_cancelled=True)
    with pytest.raises(UnusableAnnotation, match="skipped"):
        expert_label_from_webhook(payload)


def test_skipped_annotation_with_a_pairwise_choice_is_refused_too():
    """Label Studio's `was_cancelled` is "User skipped the task"; a skip submits the editor's state, a click
    included, but the annotator declined to judge: no label (reconciliation skips it alike)."""
    payload = webhook_payload(1, 5, {"prompt": "p", "answer_a": "a", "answer_b": "b"}, "left")
    payload["annotation"]["was_cancelled"] = True
    with pytest.raises(UnusableAnnotation, match="annotation 5 was skipped"):
        expert_label_from_webhook(payload)
