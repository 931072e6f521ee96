# relay: dual-delivery SMTP relay. Runs as the non-root user `relay`; publish
# port 25 with a port mapping (-p 25:2525) or grant CAP_NET_BIND_SERVICE.
#   docker build -t relay .           docker run -p 2525:2525 -p 9325:9325 relay
#   docker run relay relay demo       (the demo, in the writable /var/lib/relay)
# BASE: any Debian-based image with python3 (3.11+) and its venv module;
# contrib/docker/build-local.sh makes one with debootstrap where no registry is reachable.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

RUN useradd --system --home-dir /var/lib/relay --shell /usr/sbin/nologin relay \
    && mkdir -p /etc/relay /var/lib/relay /var/log/relay \
    && chown relay:relay /var/lib/relay /var/log/relay
WORKDIR /opt/relay
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN python3 -m venv /opt/relay/venv \
    && /opt/relay/venv/bin/pip install --no-cache-dir . \
    && /opt/relay/venv/bin/python -c "import uvloop"
COPY contrib/docker/relay.yaml contrib/docker/pilot-users.yaml /etc/relay/

ENV PATH=/opt/relay/venv/bin:$PATH \
    RELAY_CONFIG=/etc/relay/relay.yaml \
    PYTHONUNBUFFERED=1
USER relay
WORKDIR /var/lib/relay
EXPOSE 2525 9325
VOLUME ["/var/lib/relay", "/var/log/relay"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD python3 -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9325/healthz', timeout=4).status != 200)"
CMD ["relay", "serve"]
