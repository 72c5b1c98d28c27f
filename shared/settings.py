"""One settings class for every needle process, read from NEEDLE_* environment variables.

Built once in the entry point (CLI) and passed down; nothing else reads the environment."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def default_data_dir() -> Path:
    import os

    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "needle"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEEDLE_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    port: int = 8000
    nats_url: str | None = None  # use an existing NATS instead of the embedded one; a cluster: URLs comma-separated
    nats_ping_interval_s: float = 5.0  # a hung NATS server is left after ~3 intervals
    database_url: str | None = None  # use an existing Postgres instead of the embedded one
    org: Path = REPO_DEPLOY / "org" / "zhoushan.yaml"
    rules: Path = REPO_DEPLOY / "rules" / "zhoushan.yaml"
    holidays: Path = REPO_DEPLOY / "calendar" / "cn-holidays.yaml"
    stream_replicas: int = 1
    # how long start-up waits for a JetStream still settling (a fresh cluster electing leaders) before it fails
    start_timeout_s: float = Field(default=60.0, gt=0)
    duplicate_window_s: float = 120.0
    max_body_bytes: int = 64 * 1024
    # photos (POST /v1/media) have their own limit and are streamed to a temporary file, never held in memory
    media_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    # the EXIF location (GPS) of an uploaded photo is personal data: stripped before it is stored (strip, the
    # default), or kept as taken (keep). docs/SECURITY.md
    media_exif_location: Literal["strip", "keep"] = "strip"
    media_thumb_px: int = Field(default=320, ge=32, le=2048)  # the longer side of a thumbnail (?size=thumb)
    # HTTP intake processes on the one port (SO_REUSEPORT: the kernel spreads connections over them). The
    # first is the process that runs `needle up` / `needle run intake`; the others are its supervised children
    workers: int = Field(default=1, ge=1, le=64)
    reuse_port: bool = False  # bind the HTTP port with SO_REUSEPORT (set for every intake when workers > 1)
    webhook_delivery: bool = True  # this process delivers webhooks (an extra intake worker does not: one deliverer)
    metrics_dir: Path | None = None  # Prometheus multiprocess files, shared by the intake workers (set by needle)
    projections: bool = True  # run the projection worker (and the read-model API)
    workers_in_process: bool = False  # `needle up` runs router + projections in its own process (debugging)
    # the event loop of every long-running process: uvloop when installed (auto), or the standard asyncio loop
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    log_level: str = "info"
    log_json: bool = False
    sync_always: bool = False  # fsync every JetStream write (survives power loss, slower)
    # per token subject, in each HTTP process (docs/SECURITY.md); a rate of 0 switches that limit off
    rate_limit_per_s: float = Field(default=50.0, ge=0)  # writes (POST, PUT, PATCH, DELETE)
    rate_limit_burst: int = Field(default=200, ge=1)
    rate_limit_read_per_s: float = Field(default=200.0, ge=0)  # reads (GET, HEAD)
    rate_limit_read_burst: int = Field(default=1000, ge=1)
    # Open311 reads without an api_key, per client address (docs/SECURITY.md); 0 switches the limit off
    open311_anonymous_per_s: float = Field(default=5.0, ge=0)
    open311_anonymous_burst: int = Field(default=100, ge=1)
    sse_max_per_subject: int = Field(default=8, ge=1)  # open event streams per token subject (both SSE routes)
    # browser origins allowed to call the API (CORS), comma-separated or a JSON list; none by default
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # webhook targets allowed though not public (loopback, private, link-local...): host names and CIDRs,
    # comma-separated or a JSON list; none by default (services/integrations/targets.py)
    webhook_allow_private: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_max_per_owner: int = Field(default=20, ge=1)  # webhooks one token subject may hold at once
    # how often closed issues past the rulebook's retention.closed_text are crypto-shredded
    retention_sweep_s: float = Field(default=3600.0, gt=0)

    # /healthz turns 503 when the router or the projections are more than this many messages or seconds behind
    health_max_lag: int = 10_000
    health_max_lag_s: float = 120.0
    lag_sample_s: float = 1.0  # how often the HTTP process reads the consumers' lag from JetStream
    # issue states the router keeps after writing them (a fired timer of a recent dispatch needs no read). Loads
    # are index reads, cheap at any stream size; a big cache costs memory and full-collection pauses (~225 ms
    # for 50,000 states here), which showed in the timers' p99 lag
    router_state_cache: int = Field(default=10_000, ge=0)
    metrics_token: str | None = None
    # the base URL residents reach needle at (the 回访 links); default http://<host>:<port>
    public_url: str | None = None
    followup_ttl_s: float = Field(default=72 * 3600.0, gt=0)  # a 回访 link lives this long after the resolution
    # notifications (dispatch to the duty contact, warnings, breaches, the resident's 回访 link): POST JSON here
    # (an SMS or WeChat gateway behind it); none: no notifier runs
    notify_url: str | None = None
    notify_templates: Path = REPO_DEPLOY / "notify" / "templates.yaml"
    notify_language: Literal["zh", "en"] = "zh"  # when set, GET /metrics needs "Authorization: Bearer <token>"
    # the residents' key-encryption key from a KMS: a command line (no shell; split like a POSIX shell would)
    # whose stdout is the KEK as 64 hex characters (Vault agent, `aws kms decrypt`, a TPM...), run once at the
    # start of each process; unset (or blank): DIR/secrets/resident-kek.key. docs/SECURITY.md
    kek_command: str | None = None
    kek_command_timeout_s: float = Field(default=30.0, gt=0, le=600)

    @field_validator("kek_command", mode="before")
    @classmethod
    def _blank_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("cors_origins", "webhook_allow_private", mode="before")
    @classmethod
    def _split_origins(cls, v: object) -> object:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [o.strip() for o in text.split(",") if o.strip()]
        return v
