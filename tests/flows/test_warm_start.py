"""Flow runs forked from the warm forkserver (flows/warm_start.py), run by Prefect's own subprocess starter.

`prefect.flow_engine.run_flow_in_subprocess` is what the runner calls for every flow it holds as an
object (`flows.deployments` adds them with `Runner.add_flow`); these tests call it the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from prefect import flow

from flows.deployments import served_flows
from flows.warm_start import use_forkserver
from ground.settings import Settings

pytestmark = pytest.mark.integration


@flow(name="warm-start-probe")
def probe(path: str) -> None:
    """Record where the run executed: its parent process and an environment variable the starter sets."""
    parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    Path(path).write_text(json.dumps({"ppid": os.getppid(), "parent": parent,
                                      "deployment": os.environ.get("PREFECT__DEPLOYMENT_NAME")}))


def _run(path: Path) -> dict[str, object]:
    from prefect.flow_engine import run_flow_in_subprocess

    process = run_flow_in_subprocess(probe, parameters={"path": str(path)}, env={"PREFECT__DEPLOYMENT_NAME": "probe"})
    process.join(timeout=120)
    assert process.exitcode == 0
    recorded: dict[str, object] = json.loads(path.read_text())
    return recorded


def test_forkserver_runs_the_flow_in_a_child_of_the_warm_server(
    prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import prefect.flow_engine

    monkeypatch.setattr(prefect.flow_engine, "multiprocessing", prefect.flow_engine.multiprocessing)  # restored after
    use_forkserver([__name__])
    first, second = _run(tmp_path / "a.json"), _run(tmp_path / "b.json")
    assert "multiprocessing.forkserver" in str(first["parent"]) and __name__ in str(first["parent"])
    assert first["ppid"] == second["ppid"] != os.getpid()  # both forked by the same server, not by us
    assert first["deployment"] == "probe"  # the starter's environment reaches the run


def test_every_served_flow_lives_in_an_importable_module(tmp_path: Path) -> None:
    """The server preloads these modules by name; a flow defined in `__main__` could not be preloaded."""
    modules = {f.fn.__module__ for f, _ in served_flows(Settings(home=tmp_path))}
    assert "__main__" not in modules and {"flows.retrain", "flows.probe"} <= modules


def test_every_served_flow_validates_its_parameters_after_the_runners_pickling(tmp_path: Path) -> None:
    """The runner pickles the flow object into the child: a function reached through a Flow object is
    pickled by value with only the globals its code uses, so string annotations naming anything else
    (`datetime` under `from __future__ import annotations`) fail validation there, as ingest-health did."""
    import cloudpickle

    required = {"run_id": "run-1"}
    for served, _ in served_flows(Settings(home=tmp_path)):
        restored = cloudpickle.loads(cloudpickle.dumps(served))
        names = restored.parameters.required if restored.parameters.required else []
        restored.validate_parameters({name: required[name] for name in names})
