# otellama, as docker-compose.yml runs it: `otellama serve` in front of the `ollama` service on 11434.
# The same image runs the emulator and the traffic generator of the compose file's `demo` profile.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY service/ service/
# The versions the tests and benchmarks ran with, not whatever is newest today.
RUN pip install --no-cache-dir --root-user-action=ignore --prefix=/install -c constraints.txt .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin otellama \
    && mkdir -p /var/log/otellama \
    && chown otellama /var/log/otellama
COPY --from=build /install /usr/local
ENV PYTHONUNBUFFERED=1 \
    OTELLAMA_LOG_FILE=/var/log/otellama/otellama.jsonl
# The JSONL log of exchanges (rotated by size): keep it on a volume.
VOLUME ["/var/log/otellama"]
USER otellama
EXPOSE 11434
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:11434/otellama/health', timeout=3)"]
ENTRYPOINT ["otellama"]
CMD ["serve", "--host", "0.0.0.0", "--port", "11434", "--upstream", "ollama:11434"]
