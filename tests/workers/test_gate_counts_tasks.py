"""The gate judges on distinct tasks, not on labels: several annotators labelling one task give copies, and copies of
one held-out input are one coin flip however many there are. The audit's case: 40 copies of one expert triple and a
pure-noise proxy gave plan proxy_as_is, held-out accuracy 1.0 and a release, at a true accuracy of 0.495."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from prefect.logging import disable_run_logger
from sqlalchemy.orm import Session

from flows.retrain import gate
from ground.schemas import Evaluation, EvaluationRequest, ExpertLabel, FeatureTriple, ProxyPreference, TrainingRequest
from ingest.store import freeze_snapshot, make_engine
from ingest.upsert import upsert_events
from policies.condition_statistics import mean_over_groups
from policies.features.model import pairwise_accuracy
from proxyloop.testing import isolated_settings
from tests.workers.lm_helpers import PAIRS, tiny_model_dir
from workers.features import tasks
from workers.features.evaluate import heldout_accuracy
from workers.lm.evaluate import evaluate_lm_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_task_counts_once_and_distinct_ones_as_a_plain_count():
    assert mean_over_groups(np.array([1, 1, 1, 1, 0, 0]), np.array([0, 0, 0, 0, 1, 2])) == pytest.approx(1 / 3)
    assert mean_over_groups(np.array([1.0, 0.0, 0.5]), np.array([0, 0, 1])) == pytest.approx(0.5)
    assert mean_over_groups(np.array([1] * 7 + [0] * 3), np.arange(10)) == 0.7  # exactly: the gate's 0.7 floor
    with pytest.raises(ValueError, match="non-empty"):
        mean_over_groups(np.array([]), np.array([]))


class _Prefers:
    """A policy that ranks output 0 first for every input."""

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0]]).expand(x.shape[0], 3), dim=-1)


def test_a_copied_held_out_input_weighs_as_much_as_any_other():
    right = FeatureTriple(x=[0.1, 0.2], y_w=0, y_l=1)
    wrong = [FeatureTriple(x=[float(i), 1.0], y_w=2, y_l=0) for i in range(3)]
    heldout = [right] * 9 + wrong  # nine annotators agreed on one task the policy gets right
    assert heldout_accuracy(_Prefers(), heldout) == 0.25
    x = torch.tensor([t.x for t in heldout])
    y_w, y_l = torch.tensor([t.y_w for t in heldout]), torch.tensor([t.y_l for t in heldout])
    assert pairwise_accuracy(_Prefers(), x, y_w, y_l) == 0.75  # per label, as before (benches keep using it)


def test_a_tie_is_half_right_for_the_test_against_a_coin_and_wrong_for_the_accuracy():
    """Outputs no training triple used tie (UNUSED_LOGIT); a label flip leaves a tie a tie, so the test must not count
    it as a miss a flip would turn right (p too large by 3x on five right and one tie)."""
    from workers.features.evaluate import task_scores

    class Ties:
        def log_probs(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(torch.tensor([[0.5, 0.25, 0.25]])).expand(x.shape[0], 3)

    heldout = [FeatureTriple(x=[0.0, 1.0], y_w=0, y_l=1), FeatureTriple(x=[1.0, 1.0], y_w=1, y_l=2)]
    assert task_scores(Ties(), heldout) == [1.0, 0.5]
    assert heldout_accuracy(Ties(), heldout) == 0.5  # the gate's accuracy counts the tie wrong, as ever


def _snapshot(settings, expert: list[FeatureTriple], proxy: list[FeatureTriple]) -> str:
    with Session(make_engine(settings.resolved_store_url)) as session:
        upsert_events(session, [ProxyPreference(event_id=f"p{i}", proxy_name="judge", item=t)
                                for i, t in enumerate(proxy)]
                      + [ExpertLabel(event_id=f"e{i}", annotator_id=f"a{i}", item=t) for i, t in enumerate(expert)])
        snapshot = freeze_snapshot(session).snapshot_id
        session.commit()
    return snapshot


def test_forty_copies_of_one_expert_triple_cannot_release_a_noise_proxy(tmp_path):
    settings = isolated_settings(tmp_path)
    rng = np.random.default_rng(0)
    noise = [FeatureTriple(x=rng.normal(size=4).tolist(), y_w=int(a), y_l=int((a + 1 + b) % 3))
             for a, b in zip(rng.integers(0, 3, 300), rng.integers(0, 2, 300), strict=True)]
    copies = [FeatureTriple(x=[0.3, -0.1, 0.7, 0.2], y_w=0, y_l=1)] * 40
    snapshot = _snapshot(settings, copies, noise)
    request = TrainingRequest(run_id="r", snapshot_id=snapshot, store_url=settings.resolved_store_url,
                              plan="proxy_as_is", output_dir=str(tmp_path / "r"), stage1_epochs=5)
    trained = tasks.train_feature_policy(request, noise, [], torch.device("cpu"), "w", lambda _: None)
    evaluation = Evaluation.model_validate(tasks.evaluate(EvaluationRequest(
        checkpoints=trained.checkpoints, store_url=settings.resolved_store_url, snapshot_id=snapshot,
        seed=0).model_dump(mode="json")))
    assert (evaluation.n_heldout, evaluation.n_heldout_inputs) == (40, 1)
    assert {e.heldout_accuracy for e in evaluation.evaluations} <= {0.0, 1.0}  # one task: a coin, copied 40 times
    assert all(e.task_scores == [e.heldout_accuracy] for e in evaluation.evaluations)  # one share, one task
    with disable_run_logger():
        decision = gate.fn(settings, evaluation)
    assert decision.decision == "block"
    assert "1 distinct tasks (40 labels" in decision.reasons[0]
    assert "PROXYLOOP_GATE_MIN_HELDOUT_INPUTS" in decision.reasons[0]
    assert decision.reasons[-1].startswith("blocked: too little held out")  # whatever the rules' verdict above says
    enough = evaluation.model_copy(update={"n_heldout_inputs": 5})
    with disable_run_logger():
        judged = gate.fn(settings, enough)
    assert judged.decision != "block" or "distinct tasks" not in judged.reasons[0]
    assert decision.checkpoint == judged.checkpoint is not None  # an override releases the checkpoint judged


def _evaluated(tmp_path, name: str, rows: list[dict[str, str]]) -> Evaluation:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return evaluate_lm_checkpoints(str(tiny_model_dir()), str(path), [])


def test_language_model_held_out_pairs_count_each_task_once(tmp_path):
    """Copies of a pair are one task whichever way round an annotator put it; the base model's ranking is scored
    once per task."""
    distinct = [{"prompt": f"{p['prompt']} ({i})", "chosen": p["chosen"], "rejected": p["rejected"]}
                for i, p in enumerate(PAIRS * 2)]
    flipped = {**distinct[0], "chosen": distinct[0]["rejected"], "rejected": distinct[0]["chosen"]}
    copied = _evaluated(tmp_path, "copied", distinct + [distinct[0]] * 20 + [flipped])
    assert (copied.n_heldout, copied.n_heldout_inputs) == (len(distinct) + 21, len(distinct))
    plain = _evaluated(tmp_path, "distinct", distinct).base_model_log_prob_accuracy
    first = _evaluated(tmp_path, "first", distinct[:1]).base_model_log_prob_accuracy
    assert plain is not None and first in (0.0, 1.0)
    # task 0 has 22 labels, 21 one way and 1 the other: it weighs 1/8 with its own share right, not 22/30
    assert copied.base_model_log_prob_accuracy == pytest.approx(plain + ((20 * first + 1) / 22 - first) / 8)


def test_a_mixture_checkpoint_scores_a_pair_it_cannot_read_as_a_tie_and_keeps_every_task(tmp_path):
    """A held-out pair whose responses differ only past the cut was left out of the mixture's margins and not of the
    tasks: every evaluation of a mixture run with such a pair raised (the review's find)."""
    from ground.schemas import CheckpointRef
    from workers.lm.plans import MixtureRecipe, recipe_request
    from workers.lm.training.run import run_lm_training

    recipe = MixtureRecipe(simplex_dim=3, batch_size=4, proxy_epochs=1, checkpoint_every=2, max_length=96)
    rows = [{**PAIRS[i % len(PAIRS)], "prompt": f"{PAIRS[i % len(PAIRS)]['prompt']} ({i})"} for i in range(8)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trained = run_lm_training(recipe_request("stage1", recipe, run_id="s1", base_model=str(tiny_model_dir()),
                                             dataset=str(tmp_path / "train.jsonl"), output_dir=tmp_path / "s1"),
                              lambda _: None)
    shared = " the answer" * 200
    heldout = rows[:5] + [{"prompt": "Which reply?", "chosen": shared + " yes.", "rejected": shared + " no."}]
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
    evaluation = evaluate_lm_checkpoints(str(tiny_model_dir()), str(tmp_path / "heldout.jsonl"),
                                         [CheckpointRef(step=2, path=trained["checkpoints"][-1])],
                                         n_indicator_prompts=4)
    [checkpoint] = evaluation.evaluations
    assert evaluation.n_heldout_inputs == 6 and checkpoint.task_scores is not None
    assert len(checkpoint.task_scores) == 6 and checkpoint.task_scores[-1] == 0.5  # no model can tell: a tie
    assert checkpoint.heldout_accuracy == pytest.approx(sum(checkpoint.task_scores) / 6)
