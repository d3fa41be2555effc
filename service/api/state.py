"""Everything a request handler needs, built once per application by the lifespan."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from service.api.jobs import EventHub, JobQueue
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
    started_monotonic: float = field(default_factory=time.monotonic)
