"""Serving released policies over HTTP: model listing and predictions, behind API keys.

The alias is resolved on every request (one small file read) and the model cached by version,
so a release is served as soon as the registry's alias moves; no restart.
"""

from __future__ import annotations

from typing import Annotated

import torch
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from ground.schemas import MAX_FEATURE
from ground.settings import Settings
from ingest.web import SettingsDep
from policies.auth import ApiKey
from policies.http_errors import policy_error
from policies.loader import LoadedPolicy, NotAFeaturePolicy, cached_by_version, load
from policies.registry import RegistryError, aliases, list_policies, version_of
from policies.registry_remote import refresh

router = APIRouter(prefix="/v1", tags=["policies"])


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    version: int
    owned_by: str = "proxyloop"


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class PredictRequest(BaseModel):
    # As FeatureTriple's x: NaN, inf, or a value float32 cannot hold (1e39 became inf) came back as null probabilities.
    x: list[Annotated[float, Field(allow_inf_nan=False, ge=-MAX_FEATURE, le=MAX_FEATURE)]] = Field(
        min_length=1, max_length=4096)


class Prediction(BaseModel):
    model: str
    version: int
    probs: list[float]
    choice: int


_cache: dict[tuple[str, int], LoadedPolicy] = {}


def current_policy(settings: Settings, ref: str) -> LoadedPolicy:
    try:
        refresh(settings, ref)
        return cached_by_version(settings.registry_dir, ref, _cache, lambda root, exact: load(exact, root))
    except RegistryError as exc:
        raise policy_error(exc.http_status, str(exc), ref, settings) from exc
    except NotAFeaturePolicy as exc:
        raise policy_error(400, f"{ref} is not a feature-vector policy: {exc}", ref, settings) from exc


@router.get("/models", response_model=ModelList)
def list_models(settings: SettingsDep, _: ApiKey) -> ModelList:
    """Released policies and the version each alias points at.

    One broken policy must not hide the others (or 500 the listing): a policy whose aliases.json is damaged, or
    an alias whose version folder was deleted by hand, is left out and logged; requests for it get the reason."""
    import logging

    log, root, cards = logging.getLogger("proxyloop.serve"), settings.registry_dir, []
    for name in list_policies(root):
        try:
            pointed = sorted(aliases(root, name).items())
        except RegistryError as exc:
            log.warning("/v1/models leaves %s out: %s", name, exc)
            continue
        for alias, version in pointed:
            folder = root / name / str(version)
            if not folder.is_dir():
                log.warning("/v1/models leaves %s@%s out: its version folder %s is missing", name, alias, folder)
                continue
            cards.append(ModelCard(id=f"{name}@{alias}", version=version, created=int(folder.stat().st_mtime)))
    return ModelList(data=cards)


@router.get("/models/{model_id}", response_model=ModelCard)
def retrieve_model(model_id: str, settings: SettingsDep, _: ApiKey) -> ModelCard:
    """One model, as OpenAI's GET /v1/models/{model} answers it (LiteLLM, LangChain and chat UIs check a model
    exists with it): any ref chat/completions takes, `name`, `name@alias` or `name@N`."""
    try:
        refresh(settings, model_id)  # a replica with a remote registry pulls before it answers, as the routes do
        name, version = version_of(settings.registry_dir, model_id)
    except RegistryError as exc:
        raise policy_error(exc.http_status, str(exc), model_id, settings) from exc
    folder = settings.registry_dir / name / str(version)
    try:
        created = int(folder.stat().st_mtime)
    except OSError as exc:  # deleted by hand between the lookup and here
        raise policy_error(503, f"{model_id}: its version folder {folder} cannot be read ({exc})", model_id,
                           settings) from exc
    return ModelCard(id=model_id, version=version, created=created)


@router.post("/policies/{ref}/predict", response_model=Prediction)
def predict(ref: str, body: PredictRequest, settings: SettingsDep, _: ApiKey) -> Prediction:
    """Output distribution of a feature-vector policy (`name` or `name@alias`) for one input."""
    policy = current_policy(settings, ref)
    expected = policy.config.input_dim
    if len(body.x) != expected:
        raise HTTPException(422, f"x has {len(body.x)} features; {policy.version.policy} expects {expected}")
    with torch.no_grad():
        probs = policy.model.log_probs(torch.tensor([body.x])).exp()[0]  # type: ignore[operator]
    if not bool(torch.isfinite(probs).all()):
        raise HTTPException(422, "x is too large for this policy's arithmetic (its probabilities overflow)")
    return Prediction(model=f"{policy.version.policy}@{ref.partition('@')[2] or 'production'}",
                      version=policy.version.version, probs=probs.tolist(), choice=int(probs.argmax()))
