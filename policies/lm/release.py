"""Releasing a language-model checkpoint: the model files (not the optimiser state) as a registry
version of family `causal_lm`, the alias moved and logged in the promotion history, and `policy.released`
on Kafka. A LoRA checkpoint is released as its adapter plus a checked reference to its base (policies/lm/lora.py);
a mode-mixture checkpoint as its base's files and the mixture's two (policies/lm/mode_mixture.py), without the
mixture's optimiser state, which its worker keeps under the same names as every other run's.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from ground.schemas import PolicyVersion
from ground.settings import Settings
from policies.audit_log import ReleaseEvidence, record_release
from policies.lm.chat import ChatTemplateMissing, register_causal_lm, require_chat_template
from policies.lm.lora import is_lora_dir, write_base_reference
from policies.promotion import CheckpointUnreadable, announce

# Training state that a served model does not need (see workers.lm.training.checkpoint and workers.lm.mixture_run).
TRAINING_ONLY = {"optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json"}


def release_causal_lm(
    settings: Settings, checkpoint_dir: Path, lineage: dict[str, Any], alias: str = "production",
    evidence: ReleaseEvidence | None = None,
) -> PolicyVersion:
    """Register `checkpoint_dir` under `settings.chat_policy_name`, point `alias` at it, log who/why/gate/snapshot
    (`evidence`) and tell services."""
    if not any((checkpoint_dir / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise CheckpointUnreadable(f"checkpoint {checkpoint_dir} cannot be released: it holds no config.json or "
                                   "adapter_config.json (deleted or damaged after its evaluation): retrain the run")
    check_servable_tokenizer(checkpoint_dir)
    with tempfile.TemporaryDirectory(prefix="release-") as staging:
        model_dir = Path(staging) / "model"
        shutil.copytree(checkpoint_dir, model_dir, ignore=lambda _, names: [n for n in names if n in TRAINING_ONLY])
        if is_lora_dir(checkpoint_dir):  # the adapter is released with a checked reference to its base
            write_base_reference(checkpoint_dir, model_dir)
        version = register_causal_lm(settings.registry_dir, settings.chat_policy_name, model_dir, lineage, alias=None)
    record_release(settings.registry_dir, version, alias, evidence or ReleaseEvidence())
    announce(settings, version, alias, event_id=f"released-{version.policy}-{version.version}")
    return version


def check_servable_tokenizer(checkpoint_dir: Path) -> None:
    """`CheckpointUnreadable` unless the checkpoint's tokenizer loads and has a chat template. Why before the
    release: the chat route renders every request with that template, so a model released without one (a GPT-2,
    GPT-NeoX or OPT base) answers every /v1/chat/completions request with an error; refused here, the alias stays
    on the version that serves."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir), local_files_only=True)
        require_chat_template(tokenizer, checkpoint_dir)
    except ChatTemplateMissing as exc:
        raise CheckpointUnreadable(f"checkpoint {checkpoint_dir} cannot be released: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointUnreadable(f"checkpoint {checkpoint_dir} cannot be released: its tokenizer does not load "
                                   f"({type(exc).__name__}: {exc}); retrain the run") from exc
