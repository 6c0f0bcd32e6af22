"""A flow run's subprocess imports its flow module before Prefect marks the run Running, so whatever that
module imports at the top is paid on every event → flow start (docs/benchmarks.md, trigger latency).
torch (~1.5 s) and matplotlib (~0.5 s) are imported by the tasks that use them, never by the modules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "matplotlib", "safetensors", "transformers", "sklearn", "scipy")


@pytest.mark.parametrize("module", ["flows.retrain", "flows.probe", "flows.health", "flows.reconcile"])
def test_flow_module_imports_without_torch_or_matplotlib(module: str) -> None:
    code = (f"import json, sys, {module}; "
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing {module} loads {loaded}: move those imports into the functions that need them"


def test_the_lazy_imports_still_resolve() -> None:
    """The moved imports are made at run time only: import each here so a renamed target fails now, not mid-run."""
    code = ("from policies.features.conditions import run_condition_tests; "
            "from policies.lm.release import release_causal_lm; "
            "from workers.lm.base_model import ensure_chat_base_model; "
            "from workers.lm.tasks import EVALUATE_LM_TASK, TEXT_CONDITIONS_TASK, TRAIN_LM_TASK; "
            "from safetensors.torch import load_file, save_file; "
            "from flows.artifacts import _headless; _headless(); import matplotlib.pyplot; "
            "import matplotlib; print(matplotlib.get_backend())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip().splitlines()[-1].lower() == "agg"
