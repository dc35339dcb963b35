"""How the emulated Ollama behaves (:class:`EmulatorSettings`) and the fixed strings a caller may need."""

from __future__ import annotations

import dataclasses
from typing import Final

OLLAMA_VERSION: Final = "0.33.0"
DEFAULT_MODELS: Final = ("llama3.2:3b", "gemma3:1b", "qwen3:14b", "nomic-embed-text")
FAULT_HEADER: Final = "x-emulator-fault"
FAULT_MIDSTREAM_ERROR: Final = "midstream-error"
BUSY_MESSAGE: Final = "server busy, please try again.  maximum pending requests exceeded"
MIDSTREAM_MESSAGE: Final = "an error was encountered while running the model"


@dataclasses.dataclass(frozen=True)
class EmulatorSettings:
    """How the emulated Ollama behaves. Times are seconds, rates tokens per second.

    ``token_rate=0`` turns pacing off (tokens flood out as fast as they can be written); the cold load still
    takes ``load_seconds``. Each model runs ``parallel`` requests at once; at most ``parallel + max_queue``
    model runs (across all models) are admitted, and any more get 503. ``response_tokens`` bounds the
    natural length of an answer before any ``num_predict`` limit. ``max_loaded`` models stay in memory at
    once (Ollama's ``OLLAMA_MAX_LOADED_MODELS``; 0: no limit): loading one more first unloads the idle model
    that was used least recently, or waits for one to become idle.
    """

    seed: int = 0
    token_rate: float = 50.0
    load_seconds: float = 2.5
    keep_alive: float = 300.0
    parallel: int = 4
    max_queue: int = 16
    models: tuple[str, ...] = DEFAULT_MODELS
    response_tokens: tuple[int, int] = (20, 40)
    max_loaded: int = 0

    def __post_init__(self) -> None:
        if self.token_rate < 0 or self.load_seconds < 0:
            raise ValueError("token_rate and load_seconds must not be negative")
        if self.max_loaded < 0:
            raise ValueError("max_loaded must not be negative")
        if self.parallel < 1 or self.max_queue < 0:
            raise ValueError("parallel must be at least 1 and max_queue at least 0")
        low, high = self.response_tokens
        if not 1 <= low <= high:
            raise ValueError("response_tokens must be (low, high) with 1 <= low <= high")
