"""Faults in every service, mid-stream: events lost, duplicated, and seconds to recover.

Run: `.venv/bin/python -m bench.faults [--quick]` (needs `make setup`, and `make test-services` for
Debian's PostgreSQL). Each case starts its own isolated stack on free loopback ports and runs its
workload twice: once without the fault (the baseline, whose catch-up time is the reference for
`recover_s`) and once with it:

1. broker + object store (Tansu on SeaweedFS) SIGKILLed mid-stream and restarted;
2. the store (PostgreSQL) stopped (`pg_ctl stop -m fast`) for 30 s while events flow;
3. Redis stopped when a retrain sends its training task (back after the first failed attempt; the
   full run adds a 90 s outage, longer than the dispatch retries, which must end visibly failed),
   and Redis stopped for 30 s while the worker trains (the embedded Redis keeps no data);
4. the Celery worker SIGKILLed mid-training and a second one started;
5. the Prefect server SIGKILLed mid-flow (a served `retrain` run, worker training) and restarted;
6. the HTTP app SIGKILLed during a burst of Label Studio webhooks and restarted.

Acknowledged = producer future succeeded or webhook answered 200; lost = acknowledged events not
stored (for runs: a run left without a terminal state); duplicated = label_history rows beyond one
per stored id, or a run trained or released twice; recover_s = restart → every event acknowledged
up to the restart stored, or the run in a terminal state. Targets: lost = 0, duplicated = 0.
The case drivers are in tests/faults/ (harness, ingest_cases, run_cases); tests/faults runs the short
variants in `make test`.
The last line is JSON: `cases`, `lost`, `duplicated`, `max_recover_s` and `per_case`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.faults import harness, ingest_cases, run_cases
from tests.faults.harness import CaseFigures
from tests.faults.pg import create_database, postgres_server

Case = Callable[[Path, bool], CaseFigures]


def _store_case(outage_s: float, events: int) -> Case:
    def run(home: Path, inject: bool) -> CaseFigures:
        with postgres_server() as server:
            settings = harness.case_settings(home, store_url=create_database(server.url, "faults"))
            return ingest_cases.store_stopped(settings, server, inject=inject, outage_s=outage_s, warmup=events,
                                       after=events)
    return run


def plan(quick: bool) -> dict[str, Case]:
    """Case name → driver; --quick publishes fewer events and skips the long Redis outage."""
    events = 50 if quick else 300
    chosen: dict[str, Case] = {
        "broker_objectstore_sigkill": lambda home, inject: ingest_cases.broker_and_object_store_killed(
            harness.case_settings(home, broker_storage="s3"), inject=inject, warmup=events, after=events),
        "store_stopped_30s": _store_case(30, events),
        "redis_at_dispatch": lambda home, inject: run_cases.redis_stopped(
            harness.case_settings(home), inject=inject, during="dispatch"),
        "redis_30s_mid_training": lambda home, inject: run_cases.redis_stopped(
            harness.case_settings(home), inject=inject, during="training", outage_s=30),
        "worker_sigkill_mid_training": lambda home, inject: run_cases.worker_killed_mid_training(
            harness.case_settings(home), inject=inject),
        "prefect_sigkill_mid_flow": lambda home, inject: run_cases.prefect_killed_mid_flow(
            harness.case_settings(home), inject=inject, down_s=10 if quick else 30),
        "http_sigkill_webhook_burst": lambda home, inject: ingest_cases.http_killed_during_burst(
            harness.case_settings(home), inject=inject, webhooks=300 if quick else 1000,
            kill_after=100 if quick else 300),
    }
    if not quick:
        chosen["redis_90s_at_dispatch"] = lambda home, inject: run_cases.redis_stopped(
            harness.case_settings(home), inject=inject, during="dispatch", outage_s=90)
    return chosen


def _line(name: str, figures: CaseFigures) -> str:
    recover = "—" if figures.recover_s is None else f"{figures.recover_s:.1f} s"
    return (f"{name} [{'fault' if figures.fault else 'baseline'}]: acknowledged {figures.acknowledged}, "
            f"stored {figures.stored}, lost {figures.lost}, duplicated {figures.duplicated}, down "
            f"{figures.down_s:.1f} s, recover {recover}, total {figures.total_s:.1f} s; "
            f"{json.dumps(figures.detail, default=str)}")


def run_case(name: str, case: Case) -> dict[str, Any]:
    """Baseline, then the fault, each in its own home; an exception counts as a failed case."""
    figures: dict[str, CaseFigures] = {}
    for inject in (False, True):
        with tempfile.TemporaryDirectory(prefix=f"proxyloop-faults-{name}-") as home:
            started = time.monotonic()
            try:
                figures["fault" if inject else "baseline"] = case(Path(home), inject)
            except Exception as exc:  # noqa: BLE001 - one broken case must not hide the others' figures
                print(f"{name} [{'fault' if inject else 'baseline'}]: FAILED after "
                      f"{time.monotonic() - started:.0f} s: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
                return {"error": f"{type(exc).__name__}: {str(exc)[:500]}", "lost": None, "duplicated": None,
                        "recover_s": None}
        print(_line(name, figures["fault" if inject else "baseline"]), flush=True)
    fault, baseline = figures["fault"], figures["baseline"]
    return {"acknowledged": fault.acknowledged, "stored": fault.stored, "lost": fault.lost,
            "duplicated": fault.duplicated, "recover_s": fault.recover_s, "down_s": fault.down_s,
            "total_s": fault.total_s, "baseline_recover_s": baseline.recover_s, "baseline_total_s": baseline.total_s,
            "detail": fault.detail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer events, the Prefect server down 10 s, "
                        "no 90 s Redis outage")
    parser.add_argument("--case", action="append", help="run only this case (repeatable)")
    args = parser.parse_args()
    chosen = {name: case for name, case in plan(args.quick).items() if not args.case or name in args.case}
    per_case = {name: run_case(name, case) for name, case in chosen.items()}
    measured = [c for c in per_case.values() if "error" not in c]
    recovered = [c["recover_s"] for c in measured if c["recover_s"] is not None]
    result = {
        "cases": len(per_case),
        "failed_cases": len(per_case) - len(measured),
        "lost": sum(c["lost"] for c in measured),
        "duplicated": sum(c["duplicated"] for c in measured),
        "max_recover_s": max(recovered, default=None),
        "per_case": per_case,
    }
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
