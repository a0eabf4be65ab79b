"""The replies of the auth: checks. Kept apart from authcheck.py so that naming them
(events.py labels refusals for metrics) does not load the SPF and DMARC libraries."""

from __future__ import annotations

from .config import Reply

DMARC_REJECT = Reply(550, "5.7.1", (
    "routemilter: message refused: it fails DMARC and its From domain asks receivers to reject it (p=reject)",))
MULTIPLE_FROM = Reply(550, "5.7.1", (
    "routemilter: message refused: more than one From address (RFC 7489 section 6.6.1)",))
SPF_FAIL = Reply(550, "5.7.23", ("routemilter: SPF check failed: this host may not send mail for that sender",))
SPAM = Reply(550, "5.7.1", ("routemilter: message refused: the local spam filter classified it as spam",))
DNS_TEMPFAIL = Reply(451, "4.4.3", (
    "routemilter: DNS lookup failed while checking the sender, please try again later",))
