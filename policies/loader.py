"""Load a policy directory (a registry version or a checkpoint) back into a torch module.

Weights come from safetensors only; nothing here unpickles.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ground.schemas import PolicyVersion
from policies.features.model import DirectPolicy, TwoStageConfig, TwoStagePolicy
from policies.registry import (
    REGISTRY_FORMAT,
    RegistryError,
    RegistryFormatError,
    RegistryUnreadable,
    resolve,
    version_of,
)


def _two_stage(config: TwoStageConfig) -> nn.Module:
    return TwoStagePolicy(config)


def _direct(config: TwoStageConfig) -> nn.Module:
    return DirectPolicy(config.input_dim, config.n_outputs, config.hidden)


T = TypeVar("T")


class NotAFeaturePolicy(ValueError):
    """A registry version this loader cannot build: another family (e.g. `causal_lm`) or an unknown one."""


FAMILIES: dict[str, Callable[[TwoStageConfig], nn.Module]] = {"two_stage": _two_stage, "direct": _direct}


@dataclass
class LoadedPolicy:
    version: PolicyVersion
    model: nn.Module
    config: TwoStageConfig


def read_config(path: Path | str) -> tuple[str, TwoStageConfig]:
    config = json.loads((Path(path) / "config.json").read_text())
    written = config.get("format_version")
    if written is not None and written > REGISTRY_FORMAT:
        raise RegistryFormatError(f"{path} was written in registry format {written}; this proxyloop reads formats "
                                  f"up to {REGISTRY_FORMAT}: upgrade proxyloop to load it")
    family = config.get("family")
    if family not in FAMILIES:
        raise NotAFeaturePolicy(f"{path} holds a policy of family {family!r}, not a feature-vector policy "
                                f"({sorted(FAMILIES)}); language-model policies are served by /v1/chat/completions")
    return family, TwoStageConfig.from_dict(config["model"])


def load_policy_dir(path: Path | str) -> nn.Module:
    family, config = read_config(path)
    model = FAMILIES[family](config)
    tensors = load_file(str(Path(path) / "model.safetensors"))
    for name, value in model.state_dict().items():  # saved before input scaling (model.InputScaling): the identity
        if name.startswith("inputs.") and name not in tensors:
            tensors[name] = torch.ones_like(value) if name != "inputs.shift" else torch.zeros_like(value)
    missing = sorted(set(model.state_dict()) - set(tensors))
    if missing:
        raise RegistryFormatError(
            f"{path} was written in registry format 1 (its weights lack {', '.join(missing)}); this proxyloop reads "
            f"format {REGISTRY_FORMAT}: release the policy again from its run (`proxyloop approve <run-id>`), or "
            "load it with the proxyloop that wrote it")
    model.load_state_dict(tensors)
    return model.eval()


# One load at a time in a process. transformers' from_pretrained initialises on the meta device through process-wide
# patches; two at once (the first requests after a release, in the server's threads) left every model loaded in the
# process after that with meta tensors ("Cannot copy out of meta tensor"): chat serving was down until a restart.
_loading = threading.Lock()


def cached_by_version(root: Path, ref: str, cache: dict[tuple[str, int], T],
                      load_version: Callable[[Path, str], T]) -> T:
    """What `ref` points at now (aliases re-resolved on every call), loaded once per version.

    This is how serving follows a release or rollback without a restart. Requests that arrive while a version loads
    wait for it (`_loading`) instead of loading it again beside it.
    """
    key = version_of(root, ref)  # one small file read; the version itself is loaded only once
    found = cache.get(key)
    if found is None:
        with _loading:
            found = cache.get(key)
            if found is None:
                found = cache[key] = load_version(root, f"{key[0]}@{key[1]}")
    return found


def load(ref: str, root: Path | None = None) -> LoadedPolicy:
    """`policies.load("appendix-d@production")`: the released policy, ready for inference."""
    if root is None:
        from ground.settings import get_settings

        root = get_settings().registry_dir
    version = resolve(root, ref)
    try:
        return LoadedPolicy(version=version, model=load_policy_dir(version.path), config=read_config(version.path)[1])
    except (RegistryError, NotAFeaturePolicy):
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError) as exc:
        # Weights gone or damaged, a config that is not the config: the operator's to mend (503), where each of
        # these was a 500 of its own (the HTTP audit's six ways to damage a release by hand).
        raise RegistryUnreadable(f"{version.policy} v{version.version} at {version.path} cannot be loaded "
                                 f"({type(exc).__name__}: {exc}); release it again or move the alias") from exc
