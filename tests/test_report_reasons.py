"""Reason classes of real provider replies (docs/report.md, "Rejection reason classes").

The replies are as Microsoft 365 (Exchange Online, Outlook.com), Google (Gmail,
Workspace) and Zoho Mail send them: from the providers' published NDR references
and ActiveCampaign's smtp-field-manual (MIT; IPs and addresses redacted there),
with the `smtp;` DSN prefix removed.
"""

from __future__ import annotations

import pytest

from relay.report.reasons import REASON_LABELS, REASONS, classify_reason

MICROSOFT = [
    # unknown user: Directory-Based Edge Blocking, the resolver
    ("550 5.4.1 Recipient address rejected: Access denied. AS(201806281) "
     "[BN1NAM02FT022.eop-nam02.prod.protection.outlook.com]", "unknown_user"),
    ("550 5.4.1 [email@example.com]: Recipient address rejected: Access denied [example.com]",
     "unknown_user"),
    ("550 5.4.1 All recipient addresses rejected : Access denied "
     "[#.eop-nam02.prod.protection.outlook.com]", "unknown_user"),
    ("550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
     "unknown_user"),
    ("550 5.1.1 RESOLVER.ADR.RecipNotFound; not found", "unknown_user"),
    ("550 5.5.0 Requested action not taken: mailbox unavailable. "
     "[#.eop-nam12.prod.protection.outlook.com]", "unknown_user"),
    # spam / reputation
    ("550 5.7.1 Service unavailable, Client host [x.xx.xx.xx] blocked using Spamhaus. To request "
     "removal from this list see https://www.spamhaus.org/query/ip/0.0.0.0 (AS16012611)",
     "spam_content"),
    ("550 5.7.1 Service unavailable, Helo domain is listed in Spamhaus. To request removal from "
     "this list see https://www.spamhaus.org/query/lookup/ (S8001) "
     "[#.prod.protection.outlook.com]", "spam_content"),
    ("550 5.7.606 Access denied, banned sending IP [x.xx.xx.xx]. To request removal from this "
     "list please visit https://sender.office.com/ and follow the directions. (AS16012609)",
     "spam_content"),
    ("550 5.7.708 Access denied, traffic not accepted from this IP.", "spam_content"),
    ("550 5.7.1 Unfortunately, messages from [x.xx.xx.xx] weren't sent. Please contact your "
     "Internet service provider since part of their network is on our block list (S3150).",
     "spam_content"),
    # authentication policy
    ("550 5.7.509 Access denied, sending domain [example.com] does not pass DMARC verification "
     "and has a DMARC policy of reject.", "auth_policy"),
    ("550 5.7.23 The message was rejected because of Sender Policy Framework violation",
     "auth_policy"),
    # the recipient organisation's own rules
    ("550 5.7.1 RESOLVER.RST.NotAuthorized; not authorized", "policy"),
    ("550 5.7.133 RESOLVER.RST.SenderNotAuthenticatedForGroup; authentication required; "
     "Delivery restriction check failed as sender not authenticated", "policy"),
    ("550 5.7.1 TRANSPORT.RULES.RejectMessage; the message was rejected by organization policy",
     "policy"),
    ("550 5.7.520 Access denied, Your organization does not allow external forwarding. Please "
     "contact your administrator for further assistance. AS(7555)", "policy"),
    # rate limits and throttling
    ("451 4.7.500 Server busy. Please try again later from [x.xx.xx.x]. (AS77712344) "
     "[#.prod.protection.outlook.com]", "rate_limit"),
    ("451 4.7.650 The mail server [x.xx.xx.xx] has been temporarily rate limited due to IP "
     "reputation. For e-mail delivery information, see https://postmaster.live.com (S843)",
     "rate_limit"),
    ("421 4.3.2 The maximum number of concurrent connections per resource forest has exceeded "
     "a limit, closing transmission channel. example.com. PRX8 [example.com]", "rate_limit"),
    ("554 5.2.122 The recipient has exceeded their limit for the number of messages they can "
     "receive per hour. For more information go to http://go.microsoft.com/fwlink/?LinkId=526653.",
     "rate_limit"),
    ("554 5.2.121 The sender has exceeded the limit for the number of messages they can send to "
     "this recipient per hour.", "rate_limit"),
    ("450 4.7.3 Organization queue quota exceeded. [outlook.com]", "rate_limit"),
    # other: transient server errors
    ("451 4.7.0 Temporary server error. Please try again later. PRX4 NextHop: example.com",
     "other"),
    ("452 4.3.1 Insufficient system resources (TSTE) [outlook.com]", "other"),
]  # fmt: skip

GOOGLE = [
    ("550-5.1.1 The email account that you tried to reach does not exist. Please try "
     "double-checking the recipient's email address for typos or unnecessary spaces. Learn more "
     "at https://support.google.com/mail/?p=NoSuchUser d9443c01a7336-2345abcd6789si.123 - gsmtp",
     "unknown_user"),
    ("550 5.2.1 The email account that you tried to reach is disabled. Learn more at "
     "https://support.google.com/mail/?p=DisabledUser - gsmtp", "unknown_user"),
    ("550 5.7.1 [x.xx.xx.xx] Our system has detected that this message is likely unsolicited "
     "mail. To reduce the amount of spam sent to Gmail, this message has been blocked. - gsmtp",
     "spam_content"),
    ("421 4.7.0 [x.xx.xx.xx] Our system has detected that this message is suspicious due to the "
     "very low reputation of the sending domain. To best protect our users from spam, the "
     "message has been blocked. - gsmtp", "spam_content"),
    ("421 4.7.0 [x.xx.xx.xx] Our system has detected that this message is suspicious due to the "
     "nature of the content and/or the links within. - gsmtp", "spam_content"),
    ("552-5.7.0 Our system detected an illegal attachment on your message.", "spam_content"),
    ("550 5.7.1 [x.xx.xx.xx 14] Messages missing a valid address in From: header, or having no "
     "From: header, are not accepted. - gsmtp", "spam_content"),
    ("550 5.7.26 This mail is unauthenticated, which poses a security risk to the sender and "
     "Gmail users, and has been blocked. The sender must authenticate with at least one of SPF "
     "or DKIM. - gsmtp", "auth_policy"),
    ("550 5.7.1 Unauthenticated email from example.com is not accepted due to domain's DMARC "
     "policy. Please contact the administrator of example.com domain if this was a legitimate "
     "mail. - gsmtp", "auth_policy"),
    ("421 4.7.32 This mail has been rate limited because there is no DMARC alignment",
     "auth_policy"),
    ("550 5.7.1 This message violates example.com email policy. - gcdp <sessionid> - gsmtp",
     "policy"),
    ("550 5.7.1 The user or domain that you are sending to (or from) has a policy that "
     "prohibited the mail that you sent. Please contact your domain administrator for further "
     "details.", "policy"),
    ("421 4.7.28 [x.xx.xx.xx] Our system has detected an unusual rate of unsolicited mail "
     "originating from your IP address. To protect our users from spam, mail sent from your IP "
     "address has been temporarily rate limited. - gsmtp", "rate_limit"),
    ("450 4.2.1 The user you are trying to contact is receiving mail too quickly. Please resend "
     "your message at a later time. - gsmtp", "rate_limit"),
    ("550 5.2.1 The user you are trying to contact is receiving mail at a rate that prevents "
     "additional messages from being delivered. - gsmtp", "rate_limit"),
    ("552-5.2.3 Your message exceeded Google's message size limits.", "size"),
    ("452 4.2.2 The email account that you tried to reach is over quota. - gsmtp", "other"),
    ("451 4.3.0 Mail server temporarily rejected message. - gsmtp", "other"),
]  # fmt: skip

ZOHO = [
    ("550 5.1.1 <example@zoho.com> User unknown", "unknown_user"),
    ("550 5.7.1 Email rejected per DMARC policy for zoho.com", "auth_policy"),
    ("554 5.7.1 Email cannot be delivered. Reason: Email flagged as Spam.", "spam_content"),
    ("552 5.7.1 virus [name] detected by Zoho Mail", "spam_content"),
    ("541 5.4.1 Mail rejected by destination domain", "policy"),
    ("452 <example@zoho.com> Mailbox delivery restricted by policy error", "policy"),
    ("552 5.1.1 <example@zoho.com> Mailbox delivery failure policy error", "policy"),
    ("554 5.2.3 MailPolicy violation Error delivering to mailboxes,mx.zoho.com", "policy"),
    ("553 Relaying disallowed", "other"),
    ("452 4.3.1 Temporary System Error", "other"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("reply", "reason"),
    [pytest.param(r, c, id=f"microsoft-{i}") for i, (r, c) in enumerate(MICROSOFT)]
    + [pytest.param(r, c, id=f"google-{i}") for i, (r, c) in enumerate(GOOGLE)]
    + [pytest.param(r, c, id=f"zoho-{i}") for i, (r, c) in enumerate(ZOHO)],
)
def test_provider_replies(reply: str, reason: str) -> None:
    assert classify_reason(None, reply) == reason


def test_every_class_has_real_cases_and_a_label() -> None:
    seen = {c for table in (MICROSOFT, GOOGLE, ZOHO) for _, c in table}
    # "relay" is no provider's reply: the relay's own refusals (`by: relay`, test_mta.py)
    assert seen | {"relay"} == set(REASONS) == set(REASON_LABELS)
    wanted = {"unknown_user", "spam_content", "policy", "rate_limit"}
    for table in (MICROSOFT, GOOGLE):
        assert wanted <= {c for _, c in table}
    # Zoho publishes no inbound rate-limit reply: the generic rule covers it (docs/report.md)
    assert wanted - {"rate_limit"} <= {c for _, c in ZOHO}
