"""Authentication verdicts at ingress (SPEC Part 2 "Judging fairly").

spf, dkim, dmarc, arc: one check each; lookups: the DNS adapter onto
relay/resolver.py; verdict: the class; results: our Authentication-Results
header; verifier: all of it for one message, within `auth.timeout`.
"""

from relay.auth.verifier import Judgement, Message, Verifier

__all__ = ["Judgement", "Message", "Verifier"]
