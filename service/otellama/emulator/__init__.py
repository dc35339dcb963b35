"""The Ollama emulator (see ``app``)."""

from otellama.emulator.app import (
    BUSY_MESSAGE,
    DEFAULT_MODELS,
    FAULT_HEADER,
    FAULT_MIDSTREAM_ERROR,
    MIDSTREAM_MESSAGE,
    OLLAMA_VERSION,
    Cancellation,
    Emulator,
    EmulatorSettings,
    create_emulator,
)

__all__ = [
    "BUSY_MESSAGE",
    "DEFAULT_MODELS",
    "FAULT_HEADER",
    "FAULT_MIDSTREAM_ERROR",
    "MIDSTREAM_MESSAGE",
    "OLLAMA_VERSION",
    "Cancellation",
    "Emulator",
    "EmulatorSettings",
    "create_emulator",
]
