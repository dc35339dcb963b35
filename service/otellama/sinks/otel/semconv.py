"""Every telemetry name otellama emits, with units and bucket boundaries, in one place.

GenAI names come from ``opentelemetry-semantic-conventions`` (core v1.41, docs/reference.md §2); the
``ollama.*`` and ``otellama.*`` names are ours. The ``otel.sdk.processor.span.*`` metrics are the SDK's own,
recorded by its span export queue on otellama's meter provider (see :mod:`~otellama.sinks.otel.exportqueue`),
named here from the same package for the tests that read them. Nothing else in the package spells a metric or
attribute name as a literal.
"""

from __future__ import annotations

from typing import Final

from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv._incubating.attributes import otel_attributes
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics, otel_metrics
from opentelemetry.semconv.attributes import (
    error_attributes,
    http_attributes,
    server_attributes,
)

# --- span and metric attributes -------------------------------------------------------------------------
OPERATION: Final = gen_ai.GEN_AI_OPERATION_NAME
PROVIDER: Final = gen_ai.GEN_AI_PROVIDER_NAME
PROVIDER_OLLAMA: Final = "ollama"  # a custom value: the spec lists no Ollama provider
REQUEST_MODEL: Final = gen_ai.GEN_AI_REQUEST_MODEL
RESPONSE_MODEL: Final = gen_ai.GEN_AI_RESPONSE_MODEL
REQUEST_TEMPERATURE: Final = gen_ai.GEN_AI_REQUEST_TEMPERATURE
REQUEST_TOP_P: Final = gen_ai.GEN_AI_REQUEST_TOP_P
REQUEST_TOP_K: Final = gen_ai.GEN_AI_REQUEST_TOP_K
REQUEST_SEED: Final = gen_ai.GEN_AI_REQUEST_SEED
REQUEST_MAX_TOKENS: Final = gen_ai.GEN_AI_REQUEST_MAX_TOKENS
REQUEST_STOP_SEQUENCES: Final = gen_ai.GEN_AI_REQUEST_STOP_SEQUENCES
REQUEST_STREAM: Final = gen_ai.GEN_AI_REQUEST_STREAM
FINISH_REASONS: Final = gen_ai.GEN_AI_RESPONSE_FINISH_REASONS
INPUT_TOKENS: Final = gen_ai.GEN_AI_USAGE_INPUT_TOKENS
OUTPUT_TOKENS: Final = gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS
TIME_TO_FIRST_CHUNK: Final = gen_ai.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK
TOKEN_TYPE: Final = gen_ai.GEN_AI_TOKEN_TYPE
TOKEN_TYPE_INPUT: Final = gen_ai.GenAiTokenTypeValues.INPUT.value
TOKEN_TYPE_OUTPUT: Final = gen_ai.GenAiTokenTypeValues.OUTPUT.value
INPUT_MESSAGES: Final = gen_ai.GEN_AI_INPUT_MESSAGES
OUTPUT_MESSAGES: Final = gen_ai.GEN_AI_OUTPUT_MESSAGES
SERVER_ADDRESS: Final = server_attributes.SERVER_ADDRESS
SERVER_PORT: Final = server_attributes.SERVER_PORT
ERROR_TYPE: Final = error_attributes.ERROR_TYPE
HTTP_METHOD: Final = http_attributes.HTTP_REQUEST_METHOD
HTTP_STATUS: Final = http_attributes.HTTP_RESPONSE_STATUS_CODE
HTTP_ROUTE: Final = http_attributes.HTTP_ROUTE

# Ollama's raw numbers on the GenAI span, in its own units (nanoseconds), so nothing is lost to rounding.
OLLAMA_LOAD_NS: Final = "ollama.load_duration_ns"
OLLAMA_PROMPT_EVAL_NS: Final = "ollama.prompt_eval_duration_ns"
OLLAMA_EVAL_NS: Final = "ollama.eval_duration_ns"
OLLAMA_TOTAL_NS: Final = "ollama.total_duration_ns"
OLLAMA_QUEUE_NS: Final = "ollama.queue_duration_ns"
OLLAMA_PROMPT_EVAL_COUNT: Final = "ollama.prompt_eval_count"
OLLAMA_EVAL_COUNT: Final = "ollama.eval_count"
OLLAMA_COLD_START: Final = "ollama.cold_start"
OLLAMA_DONE_REASON: Final = "ollama.done_reason"
OLLAMA_CHUNKS: Final = "ollama.chunks"
OLLAMA_TOKENS_PER_SECOND: Final = "ollama.tokens_per_second"
OLLAMA_PROMPT_TOKENS_PER_SECOND: Final = "ollama.prompt_tokens_per_second"
OLLAMA_BODY_PARSED: Final = "ollama.request.body_parsed"
OUTCOME: Final = "otellama.outcome"  # ok | error | cancelled
CLIENT_NAME: Final = "otellama.client"  # from the configurable client header
UPSTREAM: Final = "otellama.upstream"  # the configured name of the host that answered (several upstreams)
ROUTE: Final = "otellama.route"  # why the router chose it: warm, least_busy, only, failover, spill, all
RETRY_EVENT: Final = "otellama.retry"  # a span event per host tried before the one that answered
RETRY_REASON: Final = "otellama.retry.reason"  # connect_error, connect_timeout, busy

# --- span names -------------------------------------------------------------------------------------------
SPAN_LOAD: Final = "ollama.load"
SPAN_PROMPT_EVAL: Final = "ollama.prompt_eval"
SPAN_EVAL: Final = "ollama.eval"
SPAN_QUEUE: Final = "ollama.queue"

# --- metrics ----------------------------------------------------------------------------------------------
# The spec's bucket advice (docs/reference.md §2), which semconv's create_* helpers do not pass.
DURATION_BUCKETS: Final = tuple(0.01 * 2**i for i in range(14))  # 0.01 … 81.92 s
TOKEN_BUCKETS: Final = tuple(4**i for i in range(14))  # 1 … 67108864
TTFT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
TPOT_BUCKETS: Final = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5)
# Ollama's phases: prompt eval and a warm load take milliseconds, a cold load tens of seconds.
PHASE_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    20,
    40,
    80,
    160,
)
THROUGHPUT_BUCKETS: Final = (1, 2, 5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000)


class Metric:
    """Name, unit and description of one instrument."""

    __slots__ = ("buckets", "description", "name", "unit")

    def __init__(self, name: str, unit: str, description: str, buckets: tuple[float, ...] | None = None):
        self.name, self.unit, self.description, self.buckets = name, unit, description, buckets


CLIENT_OPERATION_DURATION: Final = Metric(
    gen_ai_metrics.GEN_AI_CLIENT_OPERATION_DURATION, "s", "GenAI operation duration seen by otellama",
    DURATION_BUCKETS,
)  # fmt: skip
CLIENT_TOKEN_USAGE: Final = Metric(
    gen_ai_metrics.GEN_AI_CLIENT_TOKEN_USAGE, "{token}", "Input and output tokens used", TOKEN_BUCKETS
)
CLIENT_TIME_TO_FIRST_CHUNK: Final = Metric(
    gen_ai_metrics.GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK, "s",
    "Time from the request to the first response chunk", DURATION_BUCKETS,
)  # fmt: skip
SERVER_REQUEST_DURATION: Final = Metric(
    gen_ai_metrics.GEN_AI_SERVER_REQUEST_DURATION, "s", "Ollama's own request duration (total_duration)",
    DURATION_BUCKETS,
)  # fmt: skip
SERVER_TIME_TO_FIRST_TOKEN: Final = Metric(
    gen_ai_metrics.GEN_AI_SERVER_TIME_TO_FIRST_TOKEN, "s",
    "Time to the first generated token (queue, load and prompt evaluation)", TTFT_BUCKETS,
)  # fmt: skip
SERVER_TIME_PER_OUTPUT_TOKEN: Final = Metric(
    gen_ai_metrics.GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN, "s", "eval_duration / eval_count", TPOT_BUCKETS
)
LOAD_DURATION: Final = Metric("ollama.load.duration", "s", "Model load time (load_duration)", PHASE_BUCKETS)
PROMPT_EVAL_DURATION: Final = Metric(
    "ollama.prompt_eval.duration", "s", "Prompt evaluation time (prompt_eval_duration)", PHASE_BUCKETS
)
EVAL_DURATION: Final = Metric("ollama.eval.duration", "s", "Generation time (eval_duration)", PHASE_BUCKETS)
QUEUE_DURATION: Final = Metric(
    "ollama.queue.duration", "s", "Wait inside Ollama: total - load - prompt_eval - eval", PHASE_BUCKETS
)
GENERATION_THROUGHPUT: Final = Metric(
    "ollama.generation.throughput", "{token}/s", "Generated tokens per second", THROUGHPUT_BUCKETS
)
PROMPT_THROUGHPUT: Final = Metric(
    "ollama.prompt.throughput", "{token}/s", "Prompt tokens evaluated per second", THROUGHPUT_BUCKETS
)
COLD_STARTS: Final = Metric("ollama.cold_starts", "{request}", "Requests that waited for a model load")
REQUESTS: Final = Metric("ollama.requests", "{request}", "Requests by outcome: ok, error, cancelled")
IN_FLIGHT: Final = Metric("ollama.requests.in_flight", "{request}", "Requests being served now")
# --- per host, from the /api/ps poll and the router (observable gauges, read when metrics are collected) --
UPSTREAM_UP: Final = Metric(
    "otellama.upstream.up", "", "Whether the host answered its last poll (1) or not (0)"
)
UPSTREAM_IN_FLIGHT: Final = Metric(
    "otellama.upstream.requests.in_flight", "{request}", "Requests otellama has open to the host"
)
MODEL_LOADED: Final = Metric("ollama.model.loaded", "", "Whether the model is loaded on the host (/api/ps)")
MODEL_SIZE: Final = Metric("ollama.model.size", "By", "Memory the loaded model takes on the host, in all")
MODEL_VRAM: Final = Metric("ollama.model.vram", "By", "Of the loaded model's memory, the part in VRAM")
MODEL_UNLOAD_IN: Final = Metric(
    "ollama.model.unload_in", "s", "Seconds until the host unloads the model (its keep-alive)"
)
EXPORT_FAILURES: Final = Metric(
    "otellama.export.failures", "{batch}", "OTLP export batches that failed, by signal"
)
LOG_FAILURES: Final = Metric("otellama.log.failures", "{line}", "JSONL lines that could not be written")
SIGNAL: Final = "otellama.signal"  # traces | metrics, on EXPORT_FAILURES
# The exporter process (otellama.exporter), seen from the proxy that supervises it:
EXPORTER_RESTARTS: Final = Metric(
    "otellama.exporter.restarts", "{restart}", "Times the exporter process died and was started again"
)
EXPORTER_SPANS: Final = Metric("otellama.exporter.spans", "{span}", "Spans the exporter process exported")
EXPORTER_BACKLOG: Final = Metric(
    "otellama.exporter.backlog", "By", "Bytes of the JSONL log not yet exported (a collector outage grows it)"
)
EXPORTER_SKIPPED: Final = Metric(
    "otellama.exporter.skipped", "{line}", "Log lines the exporter process could not read as a record"
)
EXPORTER_DROPPED: Final = Metric(
    "otellama.exporter.dropped",
    "By",
    "Bytes of the JSONL log rotated away before they were exported (past the log's size bound)",
)

# --- the SDK's span export queue (exportqueue.py turns these on; the SDK creates and records them) --------
SPAN_PROCESSED: Final = otel_metrics.OTEL_SDK_PROCESSOR_SPAN_PROCESSED  # handed to the exporter, or dropped
SPAN_QUEUE_SIZE: Final = otel_metrics.OTEL_SDK_PROCESSOR_SPAN_QUEUE_SIZE
SPAN_QUEUE_CAPACITY: Final = otel_metrics.OTEL_SDK_PROCESSOR_SPAN_QUEUE_CAPACITY
COMPONENT_TYPE: Final = otel_attributes.OTEL_COMPONENT_TYPE
COMPONENT_TYPE_BATCHING_SPAN_PROCESSOR: Final = (
    otel_attributes.OtelComponentTypeValues.BATCHING_SPAN_PROCESSOR.value
)
# The error.type of a dropped span on SPAN_PROCESSED, as the spec prescribes (it lists them in prose only).
QUEUE_FULL: Final = "queue_full"
ALREADY_SHUTDOWN: Final = "already_shutdown"
