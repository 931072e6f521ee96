# relay: dual-delivery SMTP relay. Runs as a non-root user; publish port 25 with
# a port mapping (-p 25:2525) or grant CAP_NET_BIND_SERVICE to bind 25 directly.
FROM python:3.11-slim

RUN useradd --system --create-home --home-dir /var/lib/relay relay
WORKDIR /opt/relay
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip install --no-cache-dir . && mkdir -p /etc/relay /var/lib/relay/spool \
    && chown -R relay:relay /var/lib/relay
COPY config/ /etc/relay/

USER relay
# The config's paths are relative to it: mount your own /etc/relay with
# spool: /var/lib/relay/spool and log: /var/lib/relay/deliveries.jsonl
EXPOSE 2525 9325
VOLUME ["/var/lib/relay"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:9325/readyz', timeout=4).status != 200)"
ENTRYPOINT ["relay"]
CMD ["serve", "-c", "/etc/relay/relay.yaml"]
