"""What the HTTP layer needs, built once at start and handed to the app (no globals)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.auth import TokenVerifier
from shared.config import OrgTree, Rulebook
from shared.privacy.keystore import ResidentKeys
from shared.ratelimit import Rate, RateLimiter
from shared.settings import Settings
from shared.store.eventstore import EventStore

if TYPE_CHECKING:
    from services.media.store import MediaStore


@dataclass
class AppContext:
    settings: Settings
    org: OrgTree
    rulebook: Rulebook
    store: EventStore
    verifier: TokenVerifier
    residents: ResidentKeys | None = None  # residents' data keys (None: reports cannot carry a resident)
    health: dict[str, bool] = field(default_factory=dict)  # component -> up
    extras: dict[str, Any] = field(default_factory=dict)  # read models, SSE hub, ... (added by other services)
    media: MediaStore | None = None  # photos (None: reports and resolves cannot reference media)
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(Rate(0, 1), Rate(0, 1)))  # off unless given

    @staticmethod
    def limiter_for(settings: Settings) -> RateLimiter:
        return RateLimiter(reads=Rate(settings.rate_limit_read_per_s, settings.rate_limit_read_burst),
                           writes=Rate(settings.rate_limit_per_s, settings.rate_limit_burst))
