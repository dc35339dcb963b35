"""The ``otellama`` command."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Sequence

from otellama import __version__
from otellama.observe import summary
from otellama.settings import Settings, UserError

EXAMPLES_SERVE = """\
examples:
  otellama serve                                   # 127.0.0.1:11435 -> Ollama at 127.0.0.1:11434
  otellama serve --host 0.0.0.0 --port 11434 --upstream ollama:11434
  otellama serve --upstream gpu1=10.0.0.1:11434 --upstream gpu2=10.0.0.2:11434   # two hosts, one address
  OLLAMA_HOST=127.0.0.1:11435 ollama run llama3.2  # point any Ollama client at otellama

settings (flags win over the environment):
  OTELLAMA_HOST, OTELLAMA_PORT, OTELLAMA_UPSTREAM   as the flags
  OTELLAMA_CONNECT_TIMEOUT   seconds to connect to Ollama before answering 502 (default 10)
  OTELLAMA_READ_TIMEOUT      seconds of upstream silence before answering 504 (default: none)
  OTELLAMA_POLL_INTERVAL     with several hosts, seconds between asking each what it has loaded (default 5)
"""

EXAMPLES_EMULATE = """\
examples:
  otellama emulate                      # a fake Ollama on 127.0.0.1:11434
  otellama emulate --port 11500 --token-rate 0 --load-seconds 0.1
"""

EXAMPLES_DEMO = """\
examples:
  otellama demo                                  # emulator, proxy, a workload, and what otellama saw
  otellama demo --otlp http://127.0.0.1:4318     # also export traces and metrics to a collector
  otellama demo --log-file demo.jsonl --html demo.html
"""

EXAMPLES_REPORT = """\
examples:
  otellama report                                # the configured log and its rotated files, by model
  otellama report --since 1h --by client         # the last hour, per client
  otellama report --model 'llama*' --since 2026-08-01T09:00 --until 2026-08-01T17:00
  otellama report --json | jq '.groups[] | {group, p95: .ttft_ms.p95}'
  otellama report --html report.html logs/otellama.jsonl*

times: a duration back from now (90s, 15m, 1h, 2d, 1w, 1h30m) or a timestamp (2026-08-01,
  2026-08-01T14:00, 2026-08-01T14:00:00Z; local time without an offset)
percentiles: linear interpolation between closest ranks (numpy's default); unknown values are left out
exit status: 0 report printed, 2 nothing to read (bad option, missing file)
"""

EXAMPLES_REPLAY = """\
examples:
  OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318 otellama replay logs/otellama.jsonl*
  otellama replay --endpoint http://127.0.0.1:4317 --protocol grpc --since 2h logs/otellama.jsonl

The OTLP endpoint, protocol, headers, timeout and resource come from the standard OTEL_* variables, as for
'otellama serve'; --endpoint and --protocol override the first two. Spans keep their original trace and
span ids and timestamps; replaying twice sends them twice (backends keyed on span ids keep one).
exit status: 0 everything exported, 1 the endpoint refused some or all spans, 2 nothing to replay
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otellama",
        description="A drop-in Ollama proxy that turns every request's timings into OpenTelemetry "
        "traces and metrics, plus a local JSONL log.",
        epilog="Run 'otellama COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"otellama {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Each command's help ends with examples; exit codes: 0 done, 1 failed, 2 bad usage, 130 interrupted.
    raw = argparse.RawDescriptionHelpFormatter

    serve = commands.add_parser("serve", help="run the proxy", epilog=EXAMPLES_SERVE, formatter_class=raw)
    serve.add_argument("--host", help="address to listen on (OTELLAMA_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (OTELLAMA_PORT, default 11435)")
    serve.add_argument(
        "--upstream",
        action="append",
        help="Ollama's address in any OLLAMA_HOST form: host, host:port or http://host:port, optionally "
        "named (gpu1=http://gpu1:11434); repeat it for several hosts behind one address "
        "(OTELLAMA_UPSTREAM, comma-separated; default http://127.0.0.1:11434)",
    )

    emulate = commands.add_parser(
        "emulate",
        help="run an Ollama emulator (no model needed)",
        epilog=EXAMPLES_EMULATE,
        formatter_class=raw,
    )
    emulate.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    emulate.add_argument("--port", type=int, default=11434, help="port to listen on (default 11434)")
    emulate.add_argument("--seed", type=int, default=0, help="seed for the generated text (default 0)")
    emulate.add_argument("--token-rate", type=float, help="tokens per second; 0 streams as fast as possible")
    emulate.add_argument("--load-seconds", type=float, help="simulated cold-start model load time")

    demo = commands.add_parser(
        "demo", help="show otellama working against the emulator", epilog=EXAMPLES_DEMO, formatter_class=raw
    )
    demo.add_argument("--otlp", metavar="ENDPOINT", help="also export OTLP to this collector (base URL)")
    demo.add_argument("--log-file", help="where the demo's JSONL log goes (default: a new temporary folder)")
    demo.add_argument("--html", help="where the HTML report goes (default: report.html beside the log)")

    def time_window(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "files",
            nargs="*",
            metavar="FILE",
            help="log files (default: OTELLAMA_LOG_FILE and its rotated backups, oldest first)",
        )
        command.add_argument("--since", help="only exchanges that started at or after this time")
        command.add_argument("--until", help="only exchanges that started before this time")
        command.add_argument(
            "--model", action="append", default=[], help="only this model (glob; repeatable)"
        )
        command.add_argument(
            "--client", action="append", default=[], help="only this client (glob; repeatable)"
        )

    report = commands.add_parser(
        "report",
        help="summarise the JSONL log: latency percentiles, throughput, errors, per model",
        description="Summarise the JSONL log per group: requests, error and cancelled %%, time to first "
        "token, tokens/s, load time, cold starts, queue time, end-to-end time and tokens.",
        epilog=EXAMPLES_REPORT,
        formatter_class=raw,
    )
    time_window(report)
    report.add_argument("--by", choices=summary.GROUPINGS, default="model", help="group by (default model)")
    report.add_argument("--json", action="store_true", help="print the numbers as JSON")
    report.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page of charts")

    replay = commands.add_parser(
        "replay",
        help="re-export logged exchanges as traces over OTLP (after a collector outage)",
        description="Re-export the traces recorded in the JSONL log to the configured OTLP endpoint, with "
        "their original trace ids, span ids and timestamps.",
        epilog=EXAMPLES_REPLAY,
        formatter_class=raw,
    )
    time_window(replay)
    replay.add_argument("--endpoint", help="OTLP base URL (default: OTEL_EXPORTER_OTLP_ENDPOINT)")
    replay.add_argument(
        "--protocol",
        choices=("grpc", "http/protobuf"),
        help="OTLP protocol (default: OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf)",
    )
    commands.add_parser(
        "exporter",
        help="the exporter process 'otellama serve' starts and supervises (not run by hand)",
        description="Follow the JSONL log and export its spans and metrics over OTLP, as configured by the "
        "OTEL_* variables; started, restarted and stopped by 'otellama serve'.",
    )
    return parser


def _exporter(args: argparse.Namespace) -> int:
    from otellama.exporter.process import main as exporter_main

    return exporter_main()


def _serve(args: argparse.Namespace) -> int:
    from otellama import server
    from otellama.app import create_app
    from otellama.proxy import connection

    settings = Settings.from_env(host=args.host, port=args.port, upstream=args.upstream)
    app = create_app(settings)
    logging.getLogger("otellama").info(
        "otellama %s listening on http://%s:%d, forwarding to Ollama at %s",
        __version__,
        settings.host,
        settings.port,
        ", ".join(
            f"{host.name}={host.url}" if len(settings.hosts) > 1 else host.url for host in settings.hosts
        ),
    )
    _warn_if_unreachable(settings)
    import uvicorn

    # The guarded protocol bounds request headers and slow clients (proxy/connection.py); on SIGTERM running
    # requests get OTELLAMA_SHUTDOWN_GRACE seconds, then the lifespan flushes the log and the exporters.
    config = server.config(
        app,
        settings.host,
        settings.port,
        http=connection.protocol(settings.client_timeout),
        timeout_graceful_shutdown=settings.shutdown_grace,
    )
    # Everything loaded so far lives as long as the process: out of the collector's sight, so that a full
    # collection walks only what requests allocate (BENCHMARKS.md, "The event loop's tail").
    gc.collect()
    gc.freeze()
    uvicorn.Server(config).run()
    return 0


def _warn_if_unreachable(settings: Settings) -> None:
    """Say at start-up, naming the address and the setting, when nothing listens where Ollama should."""
    import socket

    for upstream in settings.hosts:
        try:
            socket.create_connection((upstream.host, upstream.port), timeout=1.0).close()
        except OSError as exc:
            logging.getLogger("otellama").warning(
                "Ollama does not answer at %s (%s). otellama starts anyway and answers 502 until it does; if "
                "Ollama is elsewhere, set OTELLAMA_UPSTREAM or --upstream (e.g. --upstream 127.0.0.1:11434)",
                upstream.url,
                exc.strerror or exc,
            )


def _emulate(args: argparse.Namespace) -> int:
    import dataclasses

    import uvicorn

    from otellama import server
    from otellama.emulator import EmulatorSettings, create_emulator

    options = {"seed": args.seed, "token_rate": args.token_rate, "load_seconds": args.load_seconds}
    settings = dataclasses.replace(EmulatorSettings(), **{k: v for k, v in options.items() if v is not None})
    logging.getLogger("otellama").info("Ollama emulator listening on http://%s:%d", args.host, args.port)
    uvicorn.Server(server.config(create_emulator(settings), args.host, args.port)).run()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from otellama.demo import run

    return run(
        otlp=args.otlp,
        log_file=Path(args.log_file) if args.log_file else None,
        html=Path(args.html) if args.html else None,
    )


def _report(args: argparse.Namespace) -> int:
    from otellama.tools import report

    return report.run(
        args.files,
        since=args.since,
        until=args.until,
        models=args.model,
        clients=args.client,
        by=args.by,
        as_json=args.json,
        html=args.html,
        out=sys.stdout,
        err=sys.stderr,
    )


def _replay(args: argparse.Namespace) -> int:
    from otellama.tools import replay

    return replay.run(
        args.files,
        since=args.since,
        until=args.until,
        models=args.model,
        clients=args.client,
        endpoint=args.endpoint,
        protocol=args.protocol,
        out=sys.stdout,
        err=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``otellama`` console script; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs a line per request at INFO; the JSONL log is otellama's access log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    commands = {
        "exporter": _exporter,
        "serve": _serve,
        "emulate": _emulate,
        "demo": _demo,
        "report": _report,
        "replay": _replay,
    }
    try:
        return commands[args.command](args)
    except UserError as exc:
        print(f"otellama {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `otellama report | head` stopped reading: not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that flushing stdout at exit cannot fail again
        return 0
    except KeyboardInterrupt:
        return 130
