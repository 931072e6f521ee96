"""Canaries (SPEC Part 2 "Canaries"): DKIM-signed messages the relay sends itself
through its own listener to a `(canary)` pilot entry, so the probe proves the
whole path works before any pilot user is probed."""

CANARY_GROUP = "(canary)"
CANARY_HEADER = "X-Relay-Canary"
