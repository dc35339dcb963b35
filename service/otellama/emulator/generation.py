"""The made-up output of a model run, decided up front and deterministically from a seed.

The same settings and request always give the same plan: prose tokens (and thinking tokens for a model
that thinks), a value fitting a requested JSON schema, or calls to the offered tools; ``num_predict`` cuts
it short.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from array import array
from collections.abc import Mapping
from typing import Any, Final

import orjson

from otellama.emulator.catalogue import Card
from otellama.emulator.exchange import HTTPError, dict_field, int_field, text_field
from otellama.emulator.settings import EmulatorSettings
from otellama.emulator.wire import Piece, Plan

_JSON_TOKEN: Final = re.compile(r"\w+|\s+|[^\w\s]+")
_WORD: Final = re.compile(r"[A-Za-z][A-Za-z'-]+")

_PROSE: Final = (
    "the sky light blue sun air short long waves scatter more than red because of tiny molecules in our "
    "atmosphere and this is why we see it during day while sunsets look orange as path grows through "
    "which colors reach eyes from every direction so answer depends on time place weather clouds dust"
)
_WORDS: Final = tuple(_PROSE.split())
_THOUGHT_OPENERS: Final = ("Okay", "Hmm", "Alright", "Let me think")


def count_tokens(text: str) -> int:
    """A tokenizer's count, roughly: four characters a token."""
    return (len(text) + 3) // 4


def _prose(rng: random.Random, count: int, opener: str = "") -> list[str]:
    """``count`` tokens of plausible prose: words with leading spaces, full stops now and then."""
    tokens = [opener] if opener else []
    capital = not opener
    while len(tokens) < count:
        if tokens and not capital and rng.random() < 0.1:
            tokens.append(".")
            capital = True
            continue
        word = rng.choice(_WORDS)
        word = word.capitalize() if capital else word
        tokens.append(f" {word}" if tokens else word)
        capital = False
    if count > 1 and tokens[-2] != ".":
        tokens[-1] = "."
    return tokens


def _sample(rng: random.Random, schema: Any, text: str, depth: int = 0) -> Any:
    """A value that fits a JSON schema, strings filled with ``text``."""
    if not isinstance(schema, dict) or depth > 4:
        return text
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type", "string")
    kind = next((k for k in kind if k != "null"), "null") if isinstance(kind, list) else kind
    if kind == "object":
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            return {}
        required = schema.get("required")
        names = (
            [n for n in required if n in properties]
            if isinstance(required, list) and required
            else properties
        )
        return {name: _sample(rng, properties[name], text, depth + 1) for name in names}
    if kind == "array":
        return [_sample(rng, schema.get("items"), text, depth + 1)]
    if kind == "integer":
        return rng.randint(1, 100)
    if kind == "number":
        return round(rng.uniform(0, 100), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    return None if kind == "null" else text


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def _seed(settings: EmulatorSettings, model: str, options: Mapping[str, Any], content: bytes) -> int:
    option_seed = int_field(options, "seed") or 0
    material = b"%d|%d|%s|" % (settings.seed, option_seed, model.encode()) + content
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big")


def _thinks(card: Card, name: str, think: Any) -> bool:
    capable = "thinking" in card.capabilities
    if think is None:
        return capable
    if not isinstance(think, bool) and think not in ("low", "medium", "high"):
        raise HTTPError(400, f"invalid think value: {orjson.dumps(think).decode()}")
    if think and not capable:
        raise HTTPError(400, f'"{name}" does not support thinking')
    return bool(think)


def _plan(
    settings: EmulatorSettings,
    seed: int,
    prompt_tokens: int,
    options: Mapping[str, Any],
    *,
    think: bool,
    tool_calls: list[dict[str, Any]] | None = None,
    fmt: Any = None,
) -> Plan:
    rng = random.Random(seed)
    low, high = settings.response_tokens
    pieces: list[Piece] = []
    if think:
        thought = _prose(rng, rng.randint(max(1, low // 2), max(1, high // 2)), rng.choice(_THOUGHT_OPENERS))
        pieces += [Piece("thinking", token, None, 1) for token in thought]
    if tool_calls:
        for call in tool_calls:
            cost = 4 + count_tokens(orjson.dumps(call["function"]).decode())
            pieces.append(Piece("tool", "", call, cost))
    elif fmt == "json" or isinstance(fmt, dict):
        schema = fmt if isinstance(fmt, dict) else {"type": "object", "properties": {"answer": {}}}
        text = orjson.dumps(_sample(rng, schema, " ".join(_prose(rng, 3)).strip())).decode()
        pieces += [Piece("content", token, None, 1) for token in _JSON_TOKEN.findall(text)]
    else:
        pieces += [Piece("content", token, None, 1) for token in _prose(rng, rng.randint(low, high))]
    limit = int_field(options, "num_predict") or 0
    done_reason, produced = "stop", 0
    for index, piece in enumerate(pieces):
        if 0 < limit < produced + piece.tokens:
            # A half-generated tool call is no tool call: it is dropped, its tokens still spent.
            pieces, done_reason, produced = pieces[:index], "length", limit
            break
        produced += piece.tokens
    return Plan(seed, prompt_tokens, pieces, done_reason, produced)


def _tool_calls(seed: int, tools: list[Any], messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Calls to the first one or two offered tools, arguments filled from the user's last words."""
    if messages and messages[-1].get("role") == "tool":
        return []
    rng = random.Random(seed ^ 0x7001)
    user = next((_message_text(m) for m in reversed(messages) if m.get("role") == "user"), "")
    user_words = _WORD.findall(user)
    hint = user_words[-1].title() if user_words else "Berlin"
    calls = []
    for index, tool in enumerate(tools[:2]):
        function = dict_field(tool, "function") if isinstance(tool, dict) else {}
        name = text_field(function, "name") or f"tool_{index}"
        arguments = _sample(rng, function.get("parameters") or {"type": "object"}, hint)
        call_id = "call_" + "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=8))
        calls.append({"id": call_id, "function": {"index": index, "name": name, "arguments": arguments}})
    return calls


def chat_plan(
    settings: EmulatorSettings,
    name: str,
    card: Card,
    messages: list[dict[str, Any]],
    tools: list[Any],
    think: Any,
    fmt: Any,
    options: Mapping[str, Any],
) -> Plan:
    # Ollama's order: thinking first, then the capabilities the scheduler checks.
    thinks = _thinks(card, name, think)
    if "completion" not in card.capabilities:
        raise HTTPError(400, f'"{name}" does not support chat')
    if tools and "tools" not in card.capabilities:
        raise HTTPError(400, f"{card.registry_name} does not support tools")
    seed = _seed(settings, name, options, orjson.dumps([messages, tools, fmt]))
    prompt_tokens = 2 + sum(4 + count_tokens(_message_text(m)) for m in messages)
    if tools:
        prompt_tokens += count_tokens(orjson.dumps(tools).decode())
    calls = _tool_calls(seed, tools, messages) if tools else None
    return _plan(settings, seed, prompt_tokens, options, think=thinks, tool_calls=calls, fmt=fmt)


def generate_plan(
    settings: EmulatorSettings,
    name: str,
    card: Card,
    body: Mapping[str, Any],
    prompt: str,
    options: Mapping[str, Any],
) -> Plan:
    thinks = _thinks(card, name, body.get("think"))
    if "completion" not in card.capabilities:
        raise HTTPError(400, f'"{name}" does not support generate')
    system, suffix = text_field(body, "system"), text_field(body, "suffix")
    fmt = body.get("format")
    seed = _seed(settings, name, options, orjson.dumps([system, prompt, suffix, fmt]))
    prompt_tokens = 6 + count_tokens(system) + count_tokens(prompt) + count_tokens(suffix)
    return _plan(settings, seed, prompt_tokens, options, think=thinks, fmt=fmt)


def embedding(settings: EmulatorSettings, name: str, card: Card, text: str, dimensions: int) -> list[float]:
    rng = random.Random(_seed(settings, name, {}, text.encode()))
    vector = [rng.random() - 0.5 for _ in range(card.embedding_length)]
    if 0 < dimensions < len(vector):
        vector = vector[:dimensions]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    # Through float32 and back, so values print like the float32 vectors Ollama returns.
    return array("f", [v / norm for v in vector]).tolist()
