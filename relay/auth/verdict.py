"""A message's authentication class, from its SPF, DKIM and DMARC results.

| class | when |
|---|---|
| aligned_pass | DMARC pass |
| fail | DMARC fail; or, without a DMARC record, SPF fail/softfail or a DKIM fail and no pass |
| temperror | DMARC temperror; or, without a record, a temperror and no pass |
| auth_no_policy | no DMARC record, SPF or a DKIM signature passes |
| none | nothing to judge by (no record, nothing passed or failed) |
"""

from __future__ import annotations

from relay.records import AuthClass


def classify(spf: str, dkim: list[tuple[str, str]], dmarc: str) -> AuthClass:
    if dmarc == "pass":
        return "aligned_pass"
    if dmarc == "fail":
        return "fail"
    if dmarc == "temperror":
        return "temperror"
    results = {spf, *(r for _, r in dkim)}
    if "pass" in results:
        return "auth_no_policy"
    if "temperror" in results:
        return "temperror"
    if results & {"fail", "softfail"}:
        return "fail"
    return "none"
