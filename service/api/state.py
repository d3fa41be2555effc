"""Everything a request handler needs, built once per application by the lifespan."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from service.api.admission import UploadSlots
from service.api.auth import UserDirectory
from service.api.hub import EventHub
from service.api.jobs import JobQueue
from service.api.settings import Settings
from service.api.storage import Store
from service.api.validation import ArtifactValidator, TokenizerIdentity


@dataclass
class ServiceState:
    settings: Settings
    store: Store
    hub: EventHub
    queue: JobQueue
    validator: ArtifactValidator
    tokenizer: TokenizerIdentity
    users: UserDirectory
    uploads: UploadSlots
    started_monotonic: float = field(default_factory=time.monotonic)

    async def begin_shutdown(self) -> None:
        """First thing at SIGTERM: refuse uploads in flight, kill the validator and evaluators, end streams."""
        self.queue.begin_shutdown()
        self.validator.kill_now()
        await self.hub.close()
