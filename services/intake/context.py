"""What the HTTP layer needs, built once at start by the composition root and handed to the app (no globals,
no service locator: every part another service provides is a typed field, None where this process lacks it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nats.aio.client import Client as NATS

from shared.auth import TokenVerifier
from shared.config import OrgTree, Rulebook
from shared.domain.clocks import SlaClocks
from shared.privacy.keystore import ResidentKeys
from shared.ratelimit import Rate, RateLimiter
from shared.settings import Settings
from shared.store.eventstore import EventStore

if TYPE_CHECKING:  # services started beside the intake; the app only reads them
    from services.integrations.webhooks import WebhookService
    from services.media.store import MediaStore
    from services.projections.service import ReadModels

    from .observability import LagMonitor


@dataclass
class AppContext:
    settings: Settings
    org: OrgTree
    rulebook: Rulebook
    store: EventStore
    verifier: TokenVerifier
    clocks: SlaClocks  # the SLA clock arithmetic (extension approval computes new due times with it)
    nc: NATS | None = None  # the process's NATS connection (SSE, forget, metrics)
    residents: ResidentKeys | None = None  # residents' data keys (None: reports cannot carry a resident)
    health: dict[str, bool] = field(default_factory=dict)  # component -> up
    read_models: ReadModels | None = None  # Postgres read models and how far they are (None: no queries here)
    webhooks: WebhookService | None = None  # registrations and delivery (None: not in this process)
    lag: LagMonitor | None = None  # consumer lag, for /healthz and /metrics
    media: MediaStore | None = None  # photos (None: reports and resolves cannot reference media)
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(Rate(0, 1), Rate(0, 1)))  # off unless given

    @staticmethod
    def limiter_for(settings: Settings) -> RateLimiter:
        return RateLimiter(reads=Rate(settings.rate_limit_read_per_s, settings.rate_limit_read_burst),
                           writes=Rate(settings.rate_limit_per_s, settings.rate_limit_burst))
