"""The ``otellama`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from otellama import __version__
from otellama.settings import Settings, SettingsError

EXAMPLES_SERVE = """\
examples:
  otellama serve                                   # 127.0.0.1:11435 -> Ollama at 127.0.0.1:11434
  otellama serve --host 0.0.0.0 --port 11434 --upstream ollama:11434
  OLLAMA_HOST=127.0.0.1:11435 ollama run llama3.2  # point any Ollama client at otellama

settings (flags win over the environment):
  OTELLAMA_HOST, OTELLAMA_PORT, OTELLAMA_UPSTREAM   as the flags
  OTELLAMA_CONNECT_TIMEOUT   seconds to connect to Ollama before answering 502 (default 10)
  OTELLAMA_READ_TIMEOUT      seconds of upstream silence before answering 504 (default: none)
"""

EXAMPLES_EMULATE = """\
examples:
  otellama emulate                      # a fake Ollama on 127.0.0.1:11434
  otellama emulate --port 11500 --token-rate 0 --load-seconds 0.1
"""

EXAMPLES_DEMO = """\
examples:
  otellama demo        # emulator + proxy on free ports, a scripted workload, then what otellama saw
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
    raw = argparse.RawDescriptionHelpFormatter

    serve = commands.add_parser("serve", help="run the proxy", epilog=EXAMPLES_SERVE, formatter_class=raw)
    serve.add_argument("--host", help="address to listen on (OTELLAMA_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (OTELLAMA_PORT, default 11435)")
    serve.add_argument(
        "--upstream",
        help="Ollama's address in any OLLAMA_HOST form: host, host:port or http://host:port "
        "(OTELLAMA_UPSTREAM, default http://127.0.0.1:11434)",
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

    commands.add_parser(
        "demo", help="show otellama working against the emulator", epilog=EXAMPLES_DEMO, formatter_class=raw
    )
    return parser


def _serve(args: argparse.Namespace) -> int:
    from otellama import server
    from otellama.app import create_app

    settings = Settings.from_env(host=args.host, port=args.port, upstream=args.upstream)
    app = create_app(settings)
    logging.getLogger("otellama").info(
        "otellama %s listening on http://%s:%d, forwarding to Ollama at %s",
        __version__,
        settings.host,
        settings.port,
        settings.upstream.url,
    )
    import uvicorn

    uvicorn.Server(server.config(app, settings.host, settings.port)).run()
    return 0


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
    from otellama.demo import run

    return run()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``otellama`` console script; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is the access log we dropped
    commands = {"serve": _serve, "emulate": _emulate, "demo": _demo}
    try:
        return commands[args.command](args)
    except SettingsError as exc:
        print(f"otellama: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
