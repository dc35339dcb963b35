"""The models the emulator knows: what /api/tags, /api/show and /api/ps say of one, guessed from its name."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from datetime import datetime
from typing import Any, Final

_SIZE_TAG: Final = re.compile(r"e?(\d+(?:\.\d+)?)([bm])\b")

# (name prefix, family, parameter size when the tag does not say, embedding length); first match wins.
_FAMILIES: Final = (
    ("nomic-embed", "nomic-bert", "137M", 768),
    ("mxbai-embed", "bert", "334M", 1024),
    ("all-minilm", "bert", "23M", 384),
    ("gpt-oss", "gptoss", "20.9B", 2880),
    ("qwen3", "qwen3", "8.2B", 4096),
    ("qwen2", "qwen2", "7.6B", 3584),
    ("deepseek-r1", "qwen2", "7.6B", 3584),
    ("gemma3", "gemma3", "4.3B", 2560),
    ("gemma", "gemma", "9.2B", 3584),
    ("mistral", "llama", "7.2B", 4096),
    ("llama3.2", "llama", "3.2B", 3072),
)
_THINKERS: Final = ("qwen3", "deepseek-r1", "gpt-oss", "magistral", "qwq")
_NO_TOOLS: Final = ("gemma", "llama2", "codellama", "phi", "tinyllama", "llava")


def model_key(name: str) -> str:
    """Match names as Ollama does: case-insensitively, ``:latest`` implied, the default registry optional."""
    name = name.strip().lower().removeprefix("registry.ollama.ai/").removeprefix("library/")
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def normalized(name: str) -> str:
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


@dataclasses.dataclass(frozen=True)
class Card:
    """What /api/tags, /api/show and /api/ps say of a model."""

    name: str
    modified_at: datetime
    family: str
    parameter_size: str
    parameters: int
    quantization: str
    size: int
    digest: str
    embedding_length: int
    capabilities: tuple[str, ...]

    @classmethod
    def guess(cls, name: str) -> Card:
        """A plausible description from the name alone: family, size, capabilities."""
        key = model_key(name)
        base, _, tag = key.rsplit("/", 1)[-1].partition(":")
        family, size_label, width = next(
            ((fam, label, width) for prefix, fam, label, width in _FAMILIES if base.startswith(prefix)),
            ("llama", "8.0B", 4096),
        )
        sized = _SIZE_TAG.match(tag)
        if sized:
            size_label = f"{sized[1]}{sized[2].upper()}"
        parameters = int(float(size_label[:-1]) * (1e9 if size_label.endswith("B") else 1e6))
        embedding = "embed" in base or base.startswith(("all-minilm", "bge"))
        capabilities = ["embedding"] if embedding else ["completion"]
        if not embedding and not base.startswith(_NO_TOOLS):
            capabilities.append("tools")
        if not embedding and base.startswith(_THINKERS):
            capabilities.append("thinking")
        return cls(
            name=normalized(name),
            modified_at=datetime.now(),
            family=family,
            parameter_size=size_label,
            parameters=parameters,
            quantization="F16" if embedding else "Q4_K_M",
            size=int(parameters * (2 if embedding else 0.6)),
            digest=hashlib.sha256(key.encode()).hexdigest(),
            embedding_length=width,
            capabilities=tuple(capabilities),
        )

    @property
    def registry_name(self) -> str:
        return self.name if "/" in self.name else f"registry.ollama.ai/library/{self.name}"

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization,
        }

    def layers(self) -> list[tuple[str, int]]:
        """The blobs a pull or push moves: the weights, then template, license and params."""
        key = model_key(self.name)
        sizes = (self.size, 1_481, 7_711, 96)
        return [
            (f"sha256:{hashlib.sha256(f'{key}#{i}'.encode()).hexdigest()}", s) for i, s in enumerate(sizes)
        ]
