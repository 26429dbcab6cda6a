"""The one Settings class, read from ``REWARDQ_*`` environment variables and ``.env``; api and workers share it."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REWARDQ_", env_file=".env", extra="ignore")

    database_url: str = "sqlite:///./rewardq.db"
    redis_url: str = "redis://localhost:6379/0"
    model: str = Field(default="", description="local Hugging Face encoder directory; empty = bundled MiniLM")
    artifacts_dir: Path = Path("./artifacts")
    api_keys: str = ""
    kernel: Literal["auto", "triton", "torch"] = "auto"

    batch_size: int = Field(default=256, ge=1, le=4096, description="pairs per queued message")
    encode_batch_size: int = Field(
        default=0, ge=0, le=4096, description="most texts per encoder forward; 0: 64 on a CPU, no count on a GPU"
    )
    token_budget: int = Field(default=0, ge=0, description="padded tokens per encoder forward; 0: 1024 CPU, 16384 GPU")
    autocast: Literal["off", "fp16", "bf16"] = Field(
        default="off", description="encoder precision, forced (otherwise REWARDQ_PRECISION decides)"
    )
    precision: Literal["auto", "exact", "fast"] = Field(
        default="auto",
        description="exact: the encoder in fp32; fast: bf16 on a GPU or a CPU with AMX or AVX512-BF16 (fp32 "
        "elsewhere; on a CPU in fixed shapes, so a pair scores the same in any batch); auto: fast on a GPU, exact on "
        "a CPU",
    )
    sqlite_worker_cache_mib: int = Field(
        default=32, ge=1, le=4096, description="SQLite page cache per worker connection (the API keeps SQLite's 2 MiB)"
    )
    embed_cache_size: int = Field(default=50_000, ge=0, description="embeddings kept per worker and model version")
    embed_shared_ttl_s: int = Field(
        default=86_400, ge=0, description="seconds an embedding stays in the Redis cache all workers share; 0: off"
    )
    embed_cache_redis_url: str = Field(
        default="",
        description="the Redis of the shared embedding cache; empty: REWARDQ_REDIS_URL. Give it its own Redis with "
        "maxmemory and allkeys-lru: on the broker's, that policy would evict queues and heartbeats",
    )
    embed_cache_scope: Literal["tenant", "global"] = Field(
        default="tenant",
        description="tenant: cached embeddings serve only the tenant whose texts they are (a cache hit says nothing "
        "about another tenant's texts); global: one cache for all tenants (more hits, for a single-team deployment)",
    )
    queue_high_water: int = Field(default=32, ge=1, description="most scoring messages in Redis at once")
    max_items_per_job: int = Field(default=1_000_000, ge=1)
    max_text_chars: int = Field(default=100_000, ge=1)
    max_length: int = Field(default=256, ge=8, le=8192, description="tokens per text")
    truncation: Literal["truncate", "reject"] = Field(
        default="truncate", description="a longer text is cut (and the result says so) or the item fails (too_long)"
    )
    max_body_bytes: int = Field(default=256 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    max_json_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        description="larger application/json bodies (parsed in memory: jobs, feedback and the interactive "
        "routes) get 413; ndjson bodies are streamed, up to REWARDQ_MAX_BODY_BYTES",
    )
    max_page_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=4096,
        description="a JSON page of results ends before its texts pass about this many bytes (next_cursor goes on)",
    )
    heartbeat_ttl_s: float = Field(
        default=10.0,
        gt=0,
        description="a worker process whose heartbeat is older than this is gone: its batches are queued again",
    )
    lost_after_s: float = Field(
        default=60.0,
        gt=0,
        description="a batch (or training run) enqueued this long ago, never taken, whose message is not waiting in "
        "its queue, was lost",
    )
    batch_deadline_s: float = Field(
        default=6 * 3600.0,
        gt=0,
        description="last resort: a batch whose worker still beats but has not finished it after this long is "
        "queued again (far above any batch)",
    )
    max_worker_deaths: int = Field(
        default=3,
        ge=1,
        description="a batch on which this many workers died is split, and a single item then fails as "
        "worker_lost; a training run on which this many workers died fails",
    )
    batch_time_limit_s: float = Field(
        default=3600.0, gt=0, description="hard time limit of one scoring task (its worker process is replaced)"
    )
    write_behind: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="a worker process writes a scored batch's results on a thread of its own while it takes and scores "
        "the next message (workers.writer); auto: on PostgreSQL only (SQLite takes one writer at a time, so the take "
        "and the write would wait on each other's lock)",
    )
    run_time_limit_s: float = Field(
        default=2 * 3600.0, gt=0, description="a training run still going after this long fails (soft time limit)"
    )
    max_train_steps: int = Field(
        default=20_000,
        ge=1,
        description="optimisation steps a training run may plan (epochs x batches); a run that needs more is refused",
    )
    max_feedback_per_tenant: int = Field(
        default=1_000_000, ge=1, description="feedback rows a tenant may keep (DELETE /v1/feedback frees room)"
    )
    max_schedules_per_tenant: int = Field(default=20, ge=1, description="retraining schedules per tenant")
    min_schedule_interval_s: int = Field(
        default=300, ge=1, description="a retraining schedule fires at most this often (5 minutes)"
    )
    fault_kill_marker: str = Field(
        default="",
        description="testing aid: a worker process that meets a text containing it (in a batch, or in the feedback a "
        "training run reads) kills itself",
    )
    fault_load_fail_file: str = Field(
        default="", description="testing aid: while this file exists, loading a model fails on this worker"
    )
    fault_write_hold_file: str = Field(
        default="",
        description="testing aid: while this file exists, a worker holds each batch's write before its transaction",
    )
    fault_transient_file: str = Field(
        default="",
        description="testing aid: while this file exists, scoring fails with a transient error (the database gone)",
    )
    sweep_interval_s: float = Field(
        default=5.0, gt=0, description="how often beat looks for batches and runs whose worker is gone or lost"
    )
    retention_days: float = Field(
        default=0,
        ge=0,
        description="beat deletes jobs that ended (succeeded, failed, cancelled) and feedback older than this many "
        "days, a bounded chunk at a time, hourly; 0: keep everything",
    )
    rejected_version_days: float = Field(
        default=7,
        ge=0,
        description="beat deletes a candidate version its run's gate rejected, and its files, this many days after it "
        "was made, unless something uses it (active anywhere, or named by a job); 0: keep them",
    )
    keep_versions: int = Field(
        default=0,
        ge=0,
        description="beat keeps each tenant's newest this many fine-tuned versions and deletes older ones nothing uses "
        "(active anywhere, or named by a job), with their files; 0: keep every version",
    )
    allow_anonymous: bool = Field(
        default=False,
        description="without any key, serve requests without one (as the admin of tenant 'default'); for loopback "
        "use only. Off: the API refuses to start without keys, and revoking the last key locks it",
    )
    rate_limit_per_minute: int = Field(
        default=600, ge=0, description="requests per API key (or per client address when anonymous) per minute; 0 = off"
    )
    auth_failures_per_minute: int = Field(
        default=20, ge=0, description="failed authentications per client address per minute before 429; 0 = off"
    )
    metrics_token: str = Field(
        default="",
        description="a bearer token (32+ characters) that may read /metrics, for a Prometheus scraper; an admin key "
        "may always read it, and nobody else",
    )
    docs: bool = Field(default=True, description="serve the API reference at /docs, /redoc and /openapi.json")
    ui_session_hours: float = Field(
        default=12.0,
        gt=0,
        le=24 * 30,
        description="a dashboard sign-in lasts this long (absolute; sign-out or revoking its key ends it sooner)",
    )
    fault_poison_marker: str = Field(default="", description="testing aid: a text containing it fails to score")
    gate_margin: float = Field(default=0.005, description="a candidate must beat the active version by this much")
    train_window: int = Field(
        default=100_000,
        ge=0,
        description="a training run trains on the tenant's newest feedback rows, this many (0: all of them), unless "
        "the run names its own window",
    )
    min_train_feedback: int = Field(
        default=30, ge=1, description="a run on fewer usable feedback rows (duplicates merged) ends rejected"
    )
    min_gate_comparisons: int = Field(
        default=5,
        ge=1,
        description="a run whose gate slice implies fewer comparisons (too little, too uniform feedback) ends rejected",
    )
    worker_preflight: bool = Field(
        default=True,
        description="`rewardq worker` loads the default model in a child process before it takes work, and exits "
        "saying why when it cannot (off: it starts anyway, and hands every batch it cannot score back to the queue)",
    )
    scoring_queue: str = "scoring"
    training_queue: str = "training"
    interactive_queue: str = Field(default="interactive", description="queue of the interactive lane (POST /v1/score)")
    interactive_preempt: bool = Field(
        default=True,
        description="a bulk batch stops between encoder passes while interactive work waits, and goes back to the "
        "queue (sim_exp; the passes done are kept in the embedding cache)",
    )
    max_waiters: int = Field(
        default=1000, ge=1, description="requests waiting on a job (?wait=, POST /v1/score) per API process; then 429"
    )
    interactive_max_items: int = Field(default=2048, ge=1, le=100_000, description="most pairs per interactive request")
    interactive_timeout_s: float = Field(
        default=60.0, gt=0, le=600, description="an interactive request waits this long"
    )
    score_stale_s: float = Field(
        default=30.0,
        ge=0,
        le=600,
        description="while the database is unreachable, scoring requests use the version, statistics and members "
        "they read last, if at most this old (0: answer 503 instead)",
    )
    interactive_tenant_max_pairs: int = Field(
        default=4096,
        ge=1,
        description="pairs one tenant may have on the interactive lane at once (queued or being scored, "
        "persisted requests included); more get 429 with Retry-After, so one tenant's flood cannot fill the lane",
    )

    @field_validator("database_url")
    @classmethod
    def _normalise_db_url(cls, v: str) -> str:
        # Plain postgres:// URLs (Heroku style) and the psycopg2 default both map to psycopg 3.
        for prefix in ("postgres://", "postgresql://"):
            if v.startswith(prefix):
                return "postgresql+psycopg://" + v[len(prefix) :]
        return v

    @field_validator("metrics_token")
    @classmethod
    def _check_metrics_token(cls, v: str) -> str:
        if v and len(v) < MIN_KEY_CHARS:
            raise ValueError(f"REWARDQ_METRICS_TOKEN must be at least {MIN_KEY_CHARS} characters")
        return v

    @field_validator("redis_url", "embed_cache_redis_url")
    @classmethod
    def _check_redis_url(cls, v: str, info: ValidationInfo) -> str:
        if (v or info.field_name == "redis_url") and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"REWARDQ_{str(info.field_name).upper()} must start with redis://, rediss:// or unix://")
        return v

    def embed_cache_url(self) -> str:
        """Where the shared embedding cache lives: its own Redis, or the broker's."""
        return self.embed_cache_redis_url or self.redis_url

    def worker_queues(self) -> str:
        """What `rewardq worker` consumes by default: every queue, interactive first (it is served first)."""
        return ",".join((self.interactive_queue, self.scoring_queue, self.training_queue))

    def api_key_map(self) -> dict[str, tuple[str, bool]]:
        """{key: (tenant, admin)} from REWARDQ_API_KEYS ('tenant:key,tenant:key:admin')."""
        out: dict[str, tuple[str, bool]] = {}
        for entry in filter(None, (p.strip() for p in self.api_keys.split(","))):
            parts = entry.split(":")
            admin = len(parts) == 3 and parts[2] == "admin"
            if len(parts) not in (2, 3) or not all(parts[:2]) or (len(parts) == 3 and not admin):
                # Never the entry itself in the message: it holds a key.
                raise ValueError(f"REWARDQ_API_KEYS entry {len(out) + 1} is not 'tenant:key' or 'tenant:key:admin'")
            # Entries are named by position, never by content: a key written first would be printed.
            n = len(out) + 1
            if not valid_tenant(parts[0]):
                raise ValueError(f"REWARDQ_API_KEYS entry {n}: the tenant must be {TENANT_RULE}")
            if len(parts[1]) < MIN_KEY_CHARS:
                raise ValueError(
                    f"REWARDQ_API_KEYS entry {n}: the key has {len(parts[1])} characters, fewer than "
                    f"{MIN_KEY_CHARS}; make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
            out[parts[1]] = (parts[0], admin)
        return out


TENANT_RULE = "letters, digits, '-' and '_', at most 128"
MIN_KEY_CHARS = 32
_TENANT = re.compile(r"[A-Za-z0-9_-]{1,128}")


def valid_tenant(name: str) -> bool:
    return bool(_TENANT.fullmatch(name))


@lru_cache
def get_settings() -> Settings:
    return Settings()
