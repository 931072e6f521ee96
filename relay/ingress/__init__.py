"""Inbound SMTP: check, queue durably, answer. Never talks to a provider."""

from relay.ingress.server import Ingress, IngressHandler

__all__ = ["Ingress", "IngressHandler"]
