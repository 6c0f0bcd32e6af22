"""Undefined figures survive the run record's JSON (ground/schemas.Reading, `_Readings`): NaN is written as "NaN",
which any JSON parser (and PostgreSQL) takes, and read back as NaN; an undefined top-k mass stays apart from one that
does not apply (None). Before, `proxyloop history` and the flow's next stage could not read a record whose gate
baseline or indicator was NaN (pydantic wrote null and then refused it as a float), and a NaN mass came back None."""

import json
import math

import pytest

from ground.schemas import CheckpointEvaluation, Evaluation, GateDecision, RetrainRunRecord, TrainingResult

NAN = float("nan")


def test_a_run_record_with_undefined_figures_round_trips_through_json():
    checkpoint = CheckpointEvaluation(step=3, path="/c", heldout_accuracy=NAN, topk_entropy=NAN, topk_mass=NAN,
                                      indicators={"generated/topk_entropy": NAN, "teacher_forced/topk_mass": 0.5})
    record = RetrainRunRecord(
        run_id="r",
        evaluation=Evaluation(evaluations=[checkpoint], baseline_accuracy=NAN, n_heldout=0, language_model=False),
        gate=GateDecision(decision="block", checkpoint=checkpoint, reasons=["undefined"], baseline_accuracy=NAN),
    )
    text = record.model_dump_json()
    json.loads(text, parse_constant=pytest.fail)  # plain JSON: no NaN token
    back = RetrainRunRecord.model_validate_json(text)
    assert back.gate is not None and back.evaluation is not None
    assert math.isnan(back.gate.baseline_accuracy) and math.isnan(back.evaluation.baseline_accuracy)
    read = back.evaluation.evaluations[0]
    assert math.isnan(read.heldout_accuracy) and math.isnan(read.topk_entropy) and math.isnan(read.topk_mass)
    assert math.isnan(read.indicators["generated/topk_entropy"]) and read.indicators["teacher_forced/topk_mass"] == 0.5


def test_a_training_result_without_a_loss_round_trips():
    result = TrainingResult(run_id="r", device="cpu", worker="w", checkpoints=[], final_loss=NAN, seconds=1.0)
    assert math.isnan(TrainingResult.model_validate_json(result.model_dump_json()).final_loss)


def test_null_from_an_older_record_reads_as_nan_and_an_absent_mass_stays_none():
    old = {"step": 1, "path": "/c", "heldout_accuracy": None, "topk_entropy": 0.5, "topk_mass": None}
    read = CheckpointEvaluation.model_validate(old)
    assert math.isnan(read.heldout_accuracy) and read.topk_mass is None
