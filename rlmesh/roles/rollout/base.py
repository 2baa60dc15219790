"""What every rollout backend returns: token-in/token-out samples stamped with the weight version."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rlmesh.envs import EpisodeStats


@dataclass
class Sample:
    """One generated response. Token ids are never re-tokenized between generation and training."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # rollout log-prob of each response token under the sampling distribution
    weight_version: int  # the policy version that began it
    finish_reason: str = "stop"  # stop | length
    # The version that finished it: later than weight_version when a sync landed while it was generated (its
    # tokens after the sync were sampled by the new weights). None: the same as weight_version.
    last_weight_version: int | None = None
    # A multi-turn sample's response interleaves sampled tokens (1) with tool and environment tokens (0), whose
    # logprobs are 0. None: every response token was sampled.
    response_mask: list[int] | None = None
    cached_tokens: int | None = None  # prompt tokens the engine found in its prefix cache (None: not reported)
    # An episode's: the environment's reward (None: the reward role scores the text), and on its first sample the
    # episode's turns, tool calls and ending (the others None), for the step's metrics.
    env_reward: float | None = None
    episode: EpisodeStats | None = None


def sampling_seed(base_seed: int, step: int, prompt_index: int) -> int:
    """A per-request seed from (run seed, step, prompt): reproducible and independent of routing or restarts."""
    digest = hashlib.blake2b(f"{base_seed}/{step}/{prompt_index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class BusyClock:
    """An engine's busy time: the seconds during which it had a request in flight and was not paused, since it
    started. One per rollout actor, used from its event loop only (no lock)."""

    def __init__(self) -> None:
        self.started = self.since = time.monotonic()
        self.busy_s = 0.0
        self.requests = 0
        self.pauses = 0

    def _tick(self) -> None:
        now = time.monotonic()
        if self.requests and not self.pauses:
            self.busy_s += now - self.since
        self.since = now

    @contextmanager
    def request(self) -> Iterator[None]:
        self._tick()
        self.requests += 1
        try:
            yield
        finally:
            self._tick()
            self.requests -= 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._tick()
        self.pauses += 1
        try:
            yield
        finally:
            self._tick()
            self.pauses -= 1

    def reading(self) -> dict[str, float]:
        """{"busy_s", "alive_s"}: both cumulative, so a reader takes differences between two readings."""
        self._tick()
        return {"busy_s": self.busy_s, "alive_s": self.since - self.started}
