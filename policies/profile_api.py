"""Profile endpoints: add a user's responses, list them, erase the user."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import AfterValidator, BaseModel, Field
from sqlalchemy.orm import Session

from ground.moments import as_utc
from ground.settings import Settings
from ground.validation import StoredText
from ingest.web import SettingsDep
from policies.auth import ApiKey
from policies.profile import USER_ID_PATTERN, add_item, erase_user, items_of, profile_engine

router = APIRouter(prefix="/v1/users", tags=["profiles"])
UserId = Annotated[str, Path(pattern=USER_ID_PATTERN, description="The service's user id.")]


class ResponseIn(BaseModel):
    response: StoredText = Field(min_length=1, max_length=20_000)
    query: StoredText | None = Field(None, max_length=20_000)


class ResponseOut(BaseModel):
    id: int
    response: str
    query: str | None
    source: str
    created_at: Annotated[datetime, AfterValidator(as_utc)]  # SQLite hands it back without its zone


class Erased(BaseModel):
    user_id: str
    items_deleted: int


def profile_session(settings: Settings) -> Session:
    """Objects keep their values after commit: a DELETE of the user committed between this request's commit and
    its reply made the reply's reload of the item a 500 (ObjectDeletedError), its item stored all the same."""
    return Session(profile_engine(settings.resolved_store_url), expire_on_commit=False)


@router.post("/{user_id}/responses", response_model=ResponseOut, status_code=201)
def add_response(user_id: UserId, body: ResponseIn, settings: SettingsDep, _: ApiKey) -> ResponseOut:
    """Record a response the user produced or approved."""
    with profile_session(settings) as session:
        item = add_item(session, user_id, body.response, body.query)
        session.commit()
        return ResponseOut.model_validate(item, from_attributes=True)


@router.get("/{user_id}/responses", response_model=list[ResponseOut])
def list_responses(user_id: UserId, settings: SettingsDep, _: ApiKey) -> list[ResponseOut]:
    """Everything stored for a user, newest first."""
    with profile_session(settings) as session:
        return [ResponseOut.model_validate(i, from_attributes=True) for i in items_of(session, user_id)]


@router.delete("/{user_id}", response_model=Erased)
def erase(user_id: UserId, settings: SettingsDep, _: ApiKey) -> Erased:
    """Erase a user: every stored profile item is deleted."""
    with profile_session(settings) as session:
        deleted = erase_user(session, user_id)
        session.commit()
    return Erased(user_id=user_id, items_deleted=deleted)
