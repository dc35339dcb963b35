"""otellama: a transparent Ollama proxy that turns every exchange's timings into OpenTelemetry telemetry."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("otellama")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
