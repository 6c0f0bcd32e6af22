"""Settings refuse what would be unsafe or inconsistent, with a message that names the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from ground.settings import Settings


def test_placeholder_secrets_are_refused_outside_dev(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"placeholder secrets \['dev-api-key', 'dev-webhook-secret'\]"):
        Settings(home=tmp_path, env="prod")
    with pytest.raises(ValueError, match=r"placeholder secrets \['dev-api-key'\]"):
        Settings(home=tmp_path, env="prod", webhook_secret="s3cret")
    settings = Settings(home=tmp_path, env="prod", webhook_secret="s3cret", api_keys="k1, k2")
    assert settings.api_key_list == ["k1", "k2"]


def test_an_empty_webhook_secret_is_refused_outside_dev_and_never_matches(tmp_path: Path) -> None:
    from ingest.labelstudio.webhook import secret_matches

    with pytest.raises(ValueError, match="PROXYLOOP_WEBHOOK_SECRET is empty"):
        Settings(home=tmp_path, env="prod", webhook_secret=" ", api_keys="k1")
    empty = Settings(home=tmp_path, webhook_secret="")  # dev allows it, yet nothing presented opens anything
    assert not secret_matches("", empty) and not secret_matches(None, empty)
    assert secret_matches("s3cret", Settings(home=tmp_path, webhook_secret="s3cret"))


def test_placeholders_are_allowed_in_dev(tmp_path: Path) -> None:
    assert Settings(home=tmp_path).webhook_secret == "dev-webhook-secret"


def test_unknown_settings_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="extra"):
        Settings(home=tmp_path, kafka_bootstrapp="127.0.0.1:9092")  # type: ignore[call-arg]
