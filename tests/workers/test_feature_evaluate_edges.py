"""A retrain that proxy labels alone triggered (PROXYLOOP_RETRAIN_MIN_PROXY) has no held-out expert triples: the
evaluate task raised deep in torch ("triples_to_tensors got no triples"; an IndexError with one expert label) and
the run failed; now it evaluates nothing and the gate blocks, saying why."""

import pytest
import torch
from prefect.logging import disable_run_logger
from sqlalchemy.orm import Session

from flows.retrain import gate
from ground.schemas import Evaluation, EvaluationRequest, ProxyPreference, TrainingRequest
from ingest.store import freeze_snapshot, make_engine
from ingest.synthetic import appendix_d
from ingest.upsert import upsert_events
from proxyloop.testing import isolated_settings
from workers.features import tasks
from workers.features.evaluate import expert_only_baseline

pytestmark = pytest.mark.usefixtures("one_thread")


def test_with_no_expert_triple_to_learn_from_the_baseline_is_a_coin():
    heldout = appendix_d(n_proxy=0, n_expert=6, seed=0).expert
    assert expert_only_baseline([], heldout, n_outputs=3, seed=0) == 0.5


def test_a_proxy_only_snapshot_is_evaluated_on_nothing_and_the_gate_blocks(tmp_path):
    settings = isolated_settings(tmp_path)
    task = appendix_d(n_proxy=300, n_expert=0, seed=0)
    with Session(make_engine(settings.resolved_store_url)) as session:
        upsert_events(session, [ProxyPreference(event_id=f"p{i}", proxy_name="judge", item=t)
                                for i, t in enumerate(task.proxy)])
        snapshot = freeze_snapshot(session).snapshot_id
        session.commit()
    request = TrainingRequest(run_id="r", snapshot_id=snapshot, store_url=settings.resolved_store_url,
                              plan="proxy_as_is", output_dir=str(tmp_path / "r"), stage1_epochs=5)
    trained = tasks.train_feature_policy(request, task.proxy, [], torch.device("cpu"), "w", lambda _: None)
    evaluation = Evaluation.model_validate(tasks.evaluate(EvaluationRequest(
        checkpoints=trained.checkpoints, store_url=settings.resolved_store_url, snapshot_id=snapshot,
        seed=0).model_dump(mode="json")))
    assert (evaluation.evaluations, evaluation.n_heldout) == ([], 0)
    with disable_run_logger():
        decision = gate.fn(settings, evaluation)
    assert decision.decision == "block" and "no held-out expert labels" in decision.reasons[0]
