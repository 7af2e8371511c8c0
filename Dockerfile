# authproxy: a local authenticating reverse proxy, as a sidecar image.
#
#   docker build -t authproxy .
#   docker run --rm -p 127.0.0.1:8080:8080 authproxy demo --host 0.0.0.0
#   docker run --rm -v ./config.yaml:/etc/authproxy/config.yaml:ro -e PAYMO_API_KEY authproxy
#
# No secrets are baked in: the config is mounted at /etc/authproxy/config.yaml and
# refers to ${ENV_VARS} or ${file:/run/secrets/...}.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="authproxy" \
      org.opencontainers.image.description="Local authenticating reverse proxy: plain HTTP in, the right credential out." \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT"
COPY --from=build /wheels /wheels
# hadolint ignore=DL3013
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin authproxy \
    && mkdir -p /etc/authproxy
ENV AUTHPROXY_CONFIG=/etc/authproxy/config.yaml \
    AUTHPROXY_HOST=0.0.0.0 \
    AUTHPROXY_PORT=8080 \
    AUTHPROXY_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
USER 10001
EXPOSE 8080
# SIGTERM drains in-flight requests (shutdown_timeout), runs logouts, exits 0.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('AUTHPROXY_PORT', '8080') + '/-/health', timeout=2)"]
ENTRYPOINT ["authproxy"]
CMD ["run"]
