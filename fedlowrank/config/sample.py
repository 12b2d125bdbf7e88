"""``sample.*`` of ``python main.py mode=sample``: how many tokens, how they are drawn, from which prompt."""
from __future__ import annotations

from dataclasses import dataclass

from fedlowrank.schema import ConfigError


@dataclass
class SampleConfig:
    """``sample.*`` of ``mode=sample``."""

    prompt: str = "\n"
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 50
    num_samples: int = 1
    seed: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 1 or self.num_samples < 1:
            raise ConfigError("sample.max_new_tokens and sample.num_samples must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"sample.temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"sample.top_k must be >= 1 (or null), got {self.top_k}")
        if not self.prompt:
            raise ConfigError("sample.prompt must not be empty")
