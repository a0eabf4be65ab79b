"""Address-level fallback through bounces: primary fails, backup gets it.

The seeds' workers do `forward(primary).catch(() => forward(backup))`. A real
MTA cannot answer that question during the SMTP transaction: it queues, retries
and, when a destination refuses for good, sends a bounce (DSN, RFC 3464) to the
envelope sender. So the envelope sender of every forward is a *bounce token*
in the SRS domain, and the bounce is the signal to try the next address.

    rmc=HASH=TT=BIND=RULES=POS=orig.domain=orig-local@srs.domain

* HASH: HMAC-SHA256 (the SRS secrets; the first signs, all verify) over the
  rest, base32, 10 characters (50 bits), compared with hmac.compare_digest.
  Case-insensitive, like SRS, because relays may lowercase local parts.
* TT: day number modulo 1024 (two base-32 characters, as SRS); tokens older
  than `bounces.max_age_days` are refused.
* BIND: ties the token to the one message it was minted for: 8 base32
  characters of SHA-256 over the `b=` value of our first DKIM signature on
  that forward (`x`: the forward was not signed). A returned copy is
  forwarded only if one of our signatures on it verifies AND has that `b=`:
  the token of forward A with our signed copy of forward B is refused. The
  `b=` value signs the body hash and every header field we signed, so the
  binding pins headers and body at once; Message-ID alone could be copied.
  Tokens of the older format (`rmb=`, no BIND) are still accepted until
  they expire (`max_age_days`), without this check.
* RULES: short ids of the rules that routed the message (one envelope sender
  per message, so a fan-out copy cannot name its destination: the DSN's
  Final-Recipient does). POS: `p0` for the first fan-out, `dIpJ` for a
  fallback copy, which goes to one destination and names its exact place.

Flow (Postfix): the bounce is queued by Postfix like any mail (the milter
refuses forged or expired tokens at RCPT), then delivered over LMTP to the
routemilter daemon (`BounceServer`). The handler reads the DSN, and for each
failed recipient either re-injects the returned original message to the next
address of that destination's chain (new token, DKIM-signed, through a
loopback smtpd without milters), or, when the chain is exhausted, sends the
original sender one bounce listing every destination tried and why it failed.
It answers 250 only after Postfix has queued what it re-injected; any failure
answers 451 and Postfix keeps the bounce and retries. No database: the state
is the token and the returned message, so several MX hosts can share the work.
"""

from __future__ import annotations

import asyncio
import base64
import email.parser
import email.policy
import email.utils
import hashlib
import hmac
import logging
import os
import re
import smtplib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import addresses, events, headers, sockets
from .config import BounceSettings, Config, Rule, SRSSettings
from .fromrewrite import bounce_rewrite_wanted, rewrite_returned
from .srs import day_stamp, stamp_age

log = logging.getLogger("routemilter.mail")

TOKEN_PREFIX = "rmc="
LEGACY_PREFIX = "rmb="  # tokens minted before BIND; accepted until they expire
FAILED_HEADER = "X-Routemilter-Failed"
_TRACE = "X-Routemilter"  # session.TRACE_HEADER (not imported: session imports this module)
_TS_SLOTS = 1024  # day stamps are SRS's (srs.day_stamp), in lower case here
_HASH_LEN = 10
_RULE_ID_LEN = 5
_MAX_RULES = 4  # more rules in one message: the token says "any rule" ('x')
_POS = re.compile(r"p0|d(\d{1,3})p(\d{1,3})")
_RULES = re.compile(r"x|[a-z2-7]{5}(\.[a-z2-7]{5}){0,3}")
_BIND_LEN = 8
_BIND = re.compile(r"x|[a-z2-7]{8}")
_MAX_REASONS = 50  # failure headers carried on a copy; more is a loop or an attack


class TokenError(Exception):
    """A bounce token that is malformed, forged, tampered with or expired."""


@dataclass(frozen=True)
class Token:
    rules: tuple[str, ...] | None  # rule ids; None: any rule
    dest: int | None  # None: a fan-out copy (the failed recipient says which destination)
    pos: int
    sender: str  # the original envelope sender
    address: str = ""
    binding: str | None = None  # BIND ("x": unsigned forward); None: legacy token without one


def binding_of(signature: str | bytes) -> str:
    """BIND for a DKIM-Signature value (or its b= tag value): a digest of b= (whitespace removed)."""
    text = signature.decode("ascii", "replace") if isinstance(signature, bytes) else signature
    match = re.search(r"(?:^|;)\s*b\s*=([^;]*)", text)
    value = match.group(1) if match else text
    digest = hashlib.sha256(re.sub(r"\s+", "", value).encode("ascii", "replace")).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:_BIND_LEN]


def rule_id(name: str) -> str:
    """A short, stable id for a rule name (not secret: the HMAC protects it)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:_RULE_ID_LEN]


class TokenCodec:
    """Mint and check bounce tokens. Thread-safe (immutable)."""

    def __init__(self, srs: SRSSettings, max_age_days: int, clock: Callable[[], float] = time.time):
        if not srs.secrets or any(len(s) < 1 for s in srs.secrets):
            raise ValueError("bounce tokens need at least one non-empty SRS secret")
        if not 0 < max_age_days < _TS_SLOTS:
            raise ValueError("max_age_days out of range")
        self.domain = srs.domain.lower().rstrip(".")
        self._secrets = tuple(srs.secrets)
        self._max_age = max_age_days
        self._clock = clock

    @staticmethod
    def is_token(address: str) -> bool:
        return address.lower().startswith((TOKEN_PREFIX, LEGACY_PREFIX))

    def _hash(self, secret: bytes, text: str) -> str:
        mac = hmac.new(secret, text.lower().encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
        return base64.b32encode(mac).decode("ascii").lower()[:_HASH_LEN]

    def mint(self, sender: str, rule_names: Iterable[str], dest: int | None = None, pos: int = 0,
             binding: str = "x") -> str:
        """The return address for a forward of `sender`'s message routed by `rule_names`;
        `binding`: binding_of() our first signature on it ("x": not signed)."""
        if not _BIND.fullmatch(binding):
            raise TokenError(f"bad binding {binding!r}")
        local, sep, domain = sender.rpartition("@")
        if not sep or not local or not domain or "=" in domain:
            raise TokenError(f"cannot embed sender {sender!r}")
        if domain.lower().rstrip(".") == self.domain:
            raise TokenError("sender is already in the SRS domain")  # kept as it is (plain SRS)
        if any(c <= " " or c in '"<>@\\,;:()[]' or c == "\x7f" for c in local):
            raise TokenError(f"cannot embed sender {sender!r}: its local part needs quoting")
        ids = sorted({rule_id(n) for n in rule_names})
        rules = ".".join(ids) if 0 < len(ids) <= _MAX_RULES else "x"
        where = "p0" if dest is None else f"d{dest}p{pos}"
        ts = day_stamp(self._clock()).lower()
        body = f"{ts}={binding}={rules}={where}={domain}={local}"
        # The prefix is hashed too: a legacy token cannot be re-read as a current one.
        return f"{TOKEN_PREFIX}{self._hash(self._secrets[0], TOKEN_PREFIX + body)}={body}@{self.domain}"

    def check(self, address: str) -> Token:
        """The Token in `address`; raises TokenError if it is not genuine and current."""
        local, sep, domain = address.rpartition("@")
        if not sep or domain.lower().rstrip(".") != self.domain:
            raise TokenError("not in the SRS domain")
        if not self.is_token(local):
            raise TokenError("not a bounce token")
        if any(c <= " " or c == "\x7f" for c in local):
            raise TokenError("space or control character in token")
        legacy = local.lower().startswith(LEGACY_PREFIX)
        fields = 6 if legacy else 7
        parts = local[len(TOKEN_PREFIX):].split("=", fields - 1)
        if len(parts) != fields:
            raise TokenError("malformed token")
        binding = None
        if legacy:
            found, ts, rules, where, odomain, olocal = parts
        else:
            found, ts, binding, rules, where, odomain, olocal = parts
        if len(found) != _HASH_LEN or not found.isascii():
            raise TokenError("malformed token hash")
        body = "=".join(parts[1:]) if legacy else TOKEN_PREFIX + "=".join(parts[1:])
        ok = False
        for secret in self._secrets:  # no early exit: timing does not say which secret
            ok |= hmac.compare_digest(found.lower().encode("ascii"), self._hash(secret, body).encode("ascii"))
        if not ok:
            raise TokenError("token hash does not match (forged or tampered)")
        try:
            age = stamp_age(ts, self._clock())
        except ValueError:
            raise TokenError("malformed token timestamp") from None
        if age > self._max_age:
            raise TokenError(f"token expired ({age} days old, at most {self._max_age})")
        rules = rules.lower()
        m = _POS.fullmatch(where.lower())
        if binding is not None:
            binding = binding.lower()
        if (not _RULES.fullmatch(rules) or m is None or not odomain or not olocal
                or (binding is not None and not _BIND.fullmatch(binding))):
            raise TokenError("malformed token fields")
        dest = None if m.group(1) is None else int(m.group(1))
        pos = 0 if m.group(2) is None else int(m.group(2))
        ids = None if rules == "x" else tuple(rules.split("."))
        return Token(ids, dest, pos, f"{olocal}@{odomain.lower()}", address, binding)


# ------------------------------------------------------------ DSN parsing


@dataclass
class RecipientStatus:
    """One per-recipient block of a delivery-status report."""

    final_recipient: str = ""
    original_recipient: str = ""
    action: str = ""
    status: str = ""
    diagnostic: str = ""
    remote_mta: str = ""

    @property
    def reason(self) -> str:
        text = self.diagnostic or (f"status {self.status}" if self.status else "no reason given")
        if self.remote_mta and self.remote_mta not in text:
            text = f"{text} (from {self.remote_mta})"
        return text


@dataclass
class Report:
    is_dsn: bool = False
    reporting_mta: str = ""
    recipients: list[RecipientStatus] = field(default_factory=list)
    returned: bytes | None = None  # the returned message (message/rfc822), CRLF
    returned_headers: bytes | None = None  # text/rfc822-headers, when only headers came back
    human: str = ""

    @property
    def failed(self) -> list[RecipientStatus]:
        return [r for r in self.recipients if r.action == "failed"]


_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)
_MAX_DEPTH = 4
_MAX_GROUPS = 1000


def _crlf(data: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", data)


def _split(entity: bytes) -> tuple[bytes, bytes]:
    """Header block (with its final CRLF) and body of a CRLF entity."""
    if entity.startswith(b"\r\n"):
        return b"", entity[2:]
    head, sep, body = entity.partition(b"\r\n\r\n")
    if not sep:
        return entity, b""
    return head + b"\r\n", body


def _headers(block: bytes):
    return _HEADER_PARSER.parsebytes(block + b"\r\n")


def _ctype(msg) -> tuple[str, dict]:
    try:
        ctype = (msg.get_content_type() or "text/plain").lower()
        params = {k.lower(): v for k, v in (msg.get_params() or [])[1:]}
    except Exception:  # noqa: BLE001 - a header the email package cannot read is junk
        return "text/plain", {}
    return ctype, params


def _multipart_parts(body: bytes, boundary: str) -> list[bytes]:
    try:
        b = boundary.encode("ascii")
    except UnicodeEncodeError:
        return []
    if not b or len(b) > 200:
        return []
    delim = re.compile(rb"(?:^|\r\n)--" + re.escape(b) + rb"(--)?[ \t]*(?=\r\n|$)")
    parts, start = [], None
    for m in delim.finditer(body):
        if start is not None:
            parts.append(body[start:m.start()])
        if m.group(1):
            start = None
            break
        start = m.end() + 2 if body[m.end():m.end() + 2] == b"\r\n" else m.end()
        if len(parts) > 100:
            break
    if start is not None:  # no closing delimiter: take the rest
        parts.append(body[start:])
    return parts


def _decode(body: bytes, cte: str) -> bytes:
    cte = (cte or "").strip().lower()
    try:
        if cte == "base64":
            return base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", body) + b"==", validate=False)
        if cte == "quoted-printable":
            import quopri

            return quopri.decodestring(body)
    except (ValueError, TypeError):
        return b""
    return body


def _field_value(value) -> str:
    text = str(value or "")
    text = re.sub(r"\r?\n[ \t]+", " ", text).strip()
    return "".join(c if c.isprintable() else " " for c in text)


def _typed(value) -> str:
    """'rfc822; a@b' -> 'a@b' (the address type is dropped)."""
    text = _field_value(value)
    kind, sep, rest = text.partition(";")
    return rest.strip() if sep else text


def _parse_status(body: bytes, report: Report) -> None:
    groups = [g for g in re.split(rb"\r\n(?:[ \t]*\r\n)+", body.strip(b"\r\n")) if g.strip()]
    for n, group in enumerate(groups[:_MAX_GROUPS]):
        fields = _headers(group + b"\r\n")
        if n == 0 and ("Reporting-MTA" in fields or "Final-Recipient" not in fields):
            report.reporting_mta = _typed(fields.get("Reporting-MTA"))
            if "Final-Recipient" not in fields:
                continue
        if "Final-Recipient" not in fields and "Original-Recipient" not in fields:
            continue
        report.recipients.append(RecipientStatus(
            final_recipient=_typed(fields.get("Final-Recipient")),
            original_recipient=_typed(fields.get("Original-Recipient")),
            action=_field_value(fields.get("Action")).lower(),
            status=_field_value(fields.get("Status")).split(" ")[0],
            diagnostic=_typed(fields.get("Diagnostic-Code")),
            remote_mta=_typed(fields.get("Remote-MTA")),
        ))


def _walk(entity: bytes, report: Report, depth: int) -> None:
    head, body = _split(entity)
    msg = _headers(head)
    ctype, params = _ctype(msg)
    cte = str(msg.get("Content-Transfer-Encoding") or "")
    if ctype.startswith("multipart/"):
        if depth >= _MAX_DEPTH:
            return
        if ctype == "multipart/report" and params.get("report-type", "").lower() in (
                "delivery-status", "global-delivery-status"):
            report.is_dsn = True
        for part in _multipart_parts(body, str(params.get("boundary") or "")):
            _walk(part, report, depth + 1)
    elif ctype in ("message/delivery-status", "message/global-delivery-status"):
        _parse_status(_decode(body, cte), report)
    elif ctype in ("message/rfc822", "message/global") and report.returned is None:
        report.returned = _decode(body, cte)
    elif ctype in ("text/rfc822-headers", "message/global-headers") and report.returned_headers is None:
        report.returned_headers = _decode(body, cte)
    elif ctype == "text/plain" and not report.human and depth > 0:
        report.human = _decode(body, cte)[:4000].decode("utf-8", "replace")


def parse_dsn(data: bytes) -> Report:
    """Read a delivery status notification; never raises on malformed input.

    `is_dsn` is true for a multipart/report of type delivery-status; the
    returned message is kept byte for byte (CRLF line ends), so our own DKIM
    signature on it can be verified.
    """
    report = Report()
    _walk(_crlf(bytes(data)), report, 0)
    if not report.recipients:
        report.is_dsn = False
    return report


# -------------------------------------------------------- the decision


@dataclass
class Failure:
    address: str  # the destination that failed
    reason: str
    status: str = ""


@dataclass
class Submission:
    """One message to hand back to the MTA."""

    mail_from: str
    rcpt: str
    data: bytes
    kind: str  # "fallback", "final-bounce", "reverse"


@dataclass
class Outcome:
    submissions: list[Submission] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    claims: list[str] = field(default_factory=list)  # one-time claims taken (released if the action fails)


def _find(rules: list[Rule], token: Token, failed: str) -> tuple[Rule, int, int] | None:
    """(rule, destination index, chain position) of the failed address."""
    for rule in rules:
        for index, dest in enumerate(rule.destinations):
            if token.dest is not None and index != token.dest:
                continue
            for pos, target in enumerate(dest.chain):
                if target.address == failed and ((token.dest is None and pos == 0) or
                                                 (token.dest is not None and pos == token.pos)):
                    return rule, index, pos
    if token.dest is not None:  # the config changed: find the address anywhere in the chain
        for rule in rules:
            if token.dest < len(rule.destinations):
                for pos, target in enumerate(rule.destinations[token.dest].chain):
                    if target.address == failed:
                        return rule, token.dest, pos
    return None


def _rules_of(config: Config, token: Token) -> list[Rule]:
    every = config.all_rules()
    if token.rules is None:
        return every
    return [r for r in every if rule_id(r.name) in token.rules]


def _normal(address: str) -> str:
    try:
        return str(addresses.parse(address))
    except addresses.AddressError:
        return address.strip().strip("<>").lower()


_DROP_ON_REINJECT = {"return-path", "delivered-to", "x-original-to"}




def previous_failures(message_head: bytes) -> list[Failure]:
    """Failures recorded on a fallback copy by earlier steps of its chain."""
    out = []
    for line in headers.lines(message_head):
        if headers.field_name(line) == FAILED_HEADER.lower():
            value = line.split(b":", 1)[1].decode("utf-8", "replace")
            value = re.sub(r"\r\n[ \t]+", " ", value).strip()
            address, _, rest = value.partition(";")
            status, sep, reason = rest.partition(";")
            if sep and re.fullmatch(r"\s*[245]\.\d{1,3}\.\d{1,3}\s*", status):
                out.append(Failure(address.strip(), reason.strip(), status.strip()))
            else:
                out.append(Failure(address.strip(), rest.strip()))
    return out[:_MAX_REASONS]


def _status(status: str) -> str:
    return status if re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", status or "") else "5.0.0"


def _safe(text: str, limit: int = 400) -> str:
    text = "".join(c if c.isprintable() else " " for c in text)
    return text[:limit]


class Handler:
    """Turns one bounce to a token address into submissions. No I/O but the
    one-time claims (`store`, state.py), when given one."""

    def __init__(self, policy, clock: Callable[[], float] = time.time, store=None):
        self.policy = policy
        self.config: Config = policy.config
        self.codec: TokenCodec = policy.tokens
        self.clock = clock
        self.store = store

    # -- entry point

    def handle(self, rcpt: str, mail_from: str, data: bytes) -> Outcome:
        token = self.codec.check(rcpt)  # TokenError: the caller refuses
        report = parse_dsn(data)
        outcome = Outcome()
        if not report.is_dsn:
            # Not a delivery report (a reply, an auto-responder, an old-style bounce):
            # the standard SRS behaviour, back to the original sender, once per token.
            if self._claim(outcome, token, "reverse"):
                self._reverse(token, mail_from, data, outcome)
            return outcome
        failed = report.failed
        if not failed:
            outcome.notes.append("dsn-without-failure:swallowed(" +
                                 ",".join(sorted({r.action or "?" for r in report.recipients})) + ")")
            return outcome
        rules = _rules_of(self.config, token)
        content, why_not = self._content(report, token)
        # Failures recorded by earlier steps: only from a copy we verified (our own text).
        prior = previous_failures(_split(content)[0]) if content is not None else []
        exhausted: list[Failure] = []
        seen = set()
        for status in failed:
            address = _normal(status.final_recipient or status.original_recipient)
            if address in seen:
                continue
            seen.add(address)
            if not self._claim(outcome, token, address):
                continue  # this destination's bounce was acted on already: a replay
            failure = Failure(address, _safe(status.reason), status.status)
            where = _find(rules, token, address)
            if where is None and status.original_recipient:
                # The destination forwarded it on and the next hop failed: the DSN may
                # still name the address we sent to as the original recipient.
                where = _find(rules, token, _normal(status.original_recipient))
            if where is None:
                outcome.notes.append(f"{address}:not-in-chain")
                exhausted.append(failure)
                continue
            rule, index, pos = where
            dest = rule.destinations[index]
            if content is not None and bounce_rewrite_wanted(self.config, rule.name, status.status,
                                                             status.reason, content):
                # Refused for DMARC: the same destination once more, From rewritten (authcheck.py).
                rewritten = rewrite_returned(content, self.config.dkim.domain)
                if rewritten is not None:
                    outcome.submissions.append(self._fallback(rewritten, token, rule, index, pos, prior + [failure]))
                    outcome.notes.append(f"{address}:dmarc-refused:from-rewritten")
                    continue
            if pos + 1 >= len(dest.chain):
                outcome.notes.append(f"{address}:chain-exhausted")
                exhausted.append(failure)
                continue
            if content is None:
                outcome.notes.append(f"{address}:cannot-forward:{why_not}")
                failure.reason += f" [no fallback tried: {why_not}]"
                exhausted.append(failure)
                continue
            nxt = dest.chain[pos + 1]
            outcome.submissions.append(self._fallback(content, token, rule, index, pos + 1, prior + [failure]))
            outcome.notes.append(f"{address}:fallback->{nxt.address}")
        if exhausted:
            bounce = self._final_bounce(token, prior + exhausted, report, content)
            for rcpt in self._bounce_recipients(token.sender, outcome):
                outcome.submissions.append(Submission("", rcpt, bounce, "final-bounce"))
                outcome.notes.append(f"final-bounce->{rcpt}")
        return outcome

    def _claim(self, outcome: Outcome, token: Token, what: str) -> bool:
        """One bounce-driven action per token and destination (`what`): the first bounce
        acts, a replay of it does nothing (answered 250, noted in the log line). The claim
        lasts as long as the token is valid; BounceServer releases it if the action fails."""
        if self.store is None:
            return True
        key = "bounce:" + hashlib.sha256(f"{token.address.lower()}\0{what.lower()}".encode(
            "utf-8", "surrogateescape")).hexdigest()[:40]
        days = self.config.bounces.max_age_days if self.config.bounces else _TS_SLOTS
        if self.store.claim(key, (days + 1) * 86400):
            outcome.claims.append(key)
            return True
        outcome.notes.append(f"{what}:replay-ignored")
        return False

    def _reverse(self, token: Token, mail_from: str, data: bytes, outcome: Outcome) -> None:
        """A reply to a token goes to the original sender; one in a managed domain is routed
        like any recipient (the re-injection listener has no milter)."""
        rcpts = self._bounce_recipients(token.sender, outcome)
        sender = mail_from
        if rcpts != [token.sender] and mail_from and self.policy.srs is not None:
            try:  # forwarded like the milter forwards: SRS, so SPF holds at the destination
                sender = self.policy.srs.forward(addresses.normalize(mail_from))
            except Exception as exc:  # noqa: BLE001 - SRSError, AddressError: kept as it is
                outcome.notes.append(f"srs=skipped:{exc}")
        outcome.notes.append("not-a-dsn:reversed")
        content = self._without_our_signatures(_crlf(data))
        for rcpt in rcpts:
            outcome.submissions.append(Submission(sender, rcpt, content, "reverse"))
            if rcpt != token.sender:
                outcome.notes.append(f"reverse:routed->{rcpt}")

    def _without_our_signatures(self, message: bytes) -> bytes:
        """A reversed message minus our own DKIM signatures: sent to a routed alias and to a
        token in one transaction, it was signed by the milter for the forward; reversed to
        the token's sender it must not carry our name over someone else's text."""
        if self.config.dkim is None:
            return message
        own = re.escape(self.config.dkim.domain.lower().rstrip(".").encode())
        head, body = _split(message)
        kept = [line for line in headers.lines(head)
                if not (headers.field_name(line) == "dkim-signature" and re.search(
                    rb"(?:^|;)\s*d\s*=\s*" + own + rb"\s*(?:;|$)",
                    re.sub(rb"\s+", b"", line.split(b":", 1)[1]).lower().replace(b";", b"; ")))]
        if len(kept) == len(headers.lines(head)):
            return message
        return b"\r\n".join(kept) + b"\r\n\r\n" + body

    def _bounce_recipients(self, sender: str, outcome: Outcome) -> list[str]:
        """Where the sender's bounce goes. The re-injection listener has no milter, so a
        sender in one of our managed domains is routed here (to its primaries)."""
        router = getattr(self.policy, "router", None)
        if router is None:
            return [sender]
        from .rules import Action

        decision = router.decide(sender)
        if decision.action is Action.PASS:
            return [sender]
        if decision.action is Action.ROUTE:
            targets = [d.primary.address for d in decision.destinations]
            return list(dict.fromkeys(targets + ([sender] if decision.keep else [])))
        outcome.notes.append(f"final-bounce-dropped:sender-{decision.action.value}")
        return []

    # -- the returned message

    def _content(self, report: Report, token: Token | None = None) -> tuple[bytes | None, str]:
        """The returned message reduced to what our signature covered, or None and why not."""
        if report.returned is None:
            if report.returned_headers is not None:
                return None, "only the headers were returned (RET=HDRS or bounce_size_limit)"
            return None, "the message was not returned"
        head, body = _split(report.returned)
        if not head:
            return None, "the returned message has no header"
        if self.policy.signer is None:  # nothing to verify with (documented): transit fields dropped
            kept = [line for line in headers.lines(head) if headers.field_name(line) not in _DROP_ON_REINJECT]
            return b"\r\n".join(kept) + b"\r\n\r\n" + body, ""
        signed, other = self._signed_part(report.returned, token)
        if signed is not None:
            return signed, ""
        if other:
            return None, ("the returned message carries our signature, but of another message "
                          "than this return address was made for")
        return None, "the returned message does not carry our valid DKIM signature (changed or truncated)"

    def _signed_part(self, message: bytes, token: Token | None) -> tuple[bytes | None, bool]:
        """(the message with only the header fields our verified signature covers, None);
        or (None, True) when our valid signature is there but its b= is not the token's
        BIND (another message), (None, False) when there is none. A legacy token (no BIND)
        takes any valid signature of ours."""
        import dkim

        records = self.policy.signer.dns_records()
        domain = self.config.dkim.domain.lower().rstrip(".")

        def dnsfunc(name, timeout=5):
            name = name.decode("ascii", "replace") if isinstance(name, bytes) else name
            selector, _, rest = name.rstrip(".").partition("._domainkey.")
            if rest.lower() != domain:
                return None
            txt = records.get(selector)
            return txt.encode("ascii") if txt else None

        try:
            parsed_fields, _ = dkim.rfc822_parse(message)
        except Exception:  # noqa: BLE001 - dkimpy cannot read it: it cannot verify either
            return None, False
        count = sum(1 for name, _ in parsed_fields if name.lower() == b"dkim-signature")
        other = False
        for index in range(min(count, 10)):
            try:
                d = dkim.DKIM(message)
                if not (d.verify(idx=index, dnsfunc=dnsfunc) and d.domain and d.domain.decode().lower() == domain):
                    continue
                b_value = d.signature_fields.get(b"b", b"")
                signed = list(d.include_headers)
            except Exception:  # noqa: BLE001 - dkimpy raises many kinds on junk
                continue
            if token is not None and token.binding is not None and binding_of(b"b=" + b_value) != token.binding:
                other = True
                continue
            return _covered(parsed_fields, signed) + b"\r\n" + _split(message)[1], False
        return None, other

    def _fallback(self, content: bytes, token: Token, rule: Rule, index: int, pos: int,
                  failures: list[Failure]) -> Submission:
        """The next copy: `content` (what our signature covered), our failure notes and trace
        on top, signed afresh, with a new token bound to that signature."""
        head, body = _split(content)
        server = self.config.server_name.lower()
        kept = []
        for line in headers.lines(head):
            name = headers.field_name(line)
            if name in _DROP_ON_REINJECT or name == FAILED_HEADER.lower():
                continue
            if name == _TRACE.lower() and line.split(b":", 1)[1].strip().lower().startswith(server.encode()):
                continue  # ours from an earlier step: one fresh trace below
            kept.append(line)
        failed = [f"{FAILED_HEADER}: {_safe(f.address, 200)}; {_status(f.status)}; {_safe(f.reason)}".encode()
                  for f in failures[-_MAX_REASONS:]]
        message = b"\r\n".join(failed + kept) + b"\r\n\r\n" + body
        binding = "x"
        if self.policy.signer is not None:
            try:
                signatures = self.policy.signer.sign(message)
            except Exception as exc:  # noqa: BLE001 - forwarded unsigned, never dropped
                log.warning("bounce fallback: DKIM signing failed: %s", exc)
                signatures = []
            if signatures:
                binding = binding_of(signatures[0][1])
            sig_lines = [f"{n}: {v.replace(chr(10), chr(13) + chr(10))}".encode("ascii") for n, v in signatures]
            message = b"\r\n".join(sig_lines) + (b"\r\n" if sig_lines else b"") + message
        target = rule.destinations[index].chain[pos]
        sender = self.codec.mint(token.sender, [rule.name], dest=index, pos=pos, binding=binding)
        # Our trace on top, outside the signature (the token is bound to it): the stamp
        # starts the next address's fallback_after clock now (deferrals.py).
        from .deferrals import stamp

        trace = (f"{_TRACE}: {_safe(self.config.server_name, 200)}; rules={_safe(rule.name, 200)}; "
                 + stamp(self.config.srs.secrets, sender, self.clock())).encode("utf-8")
        message = trace + b"\r\n" + message
        return Submission(sender, target.address, message, "fallback")

    def _final_bounce(self, token: Token, failures: list[Failure], report: Report,
                      content: bytes | None = None) -> bytes:
        """One DSN (RFC 3464) to the original sender listing every destination tried.

        Signed, so it holds only text we wrote or verified: the human part names the
        addresses and status codes; the remote servers' replies are quoted only as the
        Diagnostic-Code fields of the machine-readable delivery-status part (data, as in
        any DSN); the attached headers are those our signature covered on the returned
        copy (`content`), else none (anyone could have written them)."""
        server = self.config.server_name
        boundary = f"rm-{os.urandom(8).hex()}"
        now = email.utils.formatdate(self.clock(), localtime=False)
        orig_head = _split(content)[0] if content is not None else b""
        subject = ""
        for line in headers.lines(orig_head):
            if headers.field_name(line) == "subject":
                subject = _safe(line.split(b":", 1)[1].decode("utf-8", "replace").strip(), 200)
        lines = [
            "This is the mail system at " + server + ".",
            "",
            "Your message" + (f' "{subject}"' if subject else "") + " could not be delivered.",
            "Every destination it was routed to was tried, in order, and failed:",
            "",
        ]
        lines += [f"  <{_safe(f.address, 300)}>: status {_status(f.status)}" for f in failures]
        lines += ["", "What each receiving server answered is quoted, as it sent it, in the",
                  "attached delivery report (Diagnostic-Code); it is their text, not ours."]
        if content is not None:
            lines += ["The headers of your message are attached."]
        else:
            lines += ["The returned copy could not be verified as the message we forwarded,",
                      "so its headers are not attached."]
        human = "\r\n".join(lines) + "\r\n"
        per_message = f"Reporting-MTA: dns; {server}\r\n"
        per_rcpt = []
        for f in failures:
            status = _status(f.status) if (f.status or "").startswith("5") else "5.0.0"
            per_rcpt.append(f"Final-Recipient: rfc822; {_safe(f.address, 300)}\r\n"
                            f"Action: failed\r\n"
                            f"Status: {status}\r\n"
                            f"Diagnostic-Code: smtp; {_safe(f.reason, 900)}\r\n")
        status_part = per_message + "\r\n" + "\r\n".join(per_rcpt)
        head_text = (
            f"From: Mail Delivery System <MAILER-DAEMON@{self.codec.domain}>\r\n"
            f"To: <{token.sender}>\r\n"
            f"Subject: Undelivered Mail Returned to Sender\r\n"
            f"Date: {now}\r\n"
            f"Message-ID: <{os.urandom(12).hex()}@{server}>\r\n"
            f"Auto-Submitted: auto-replied\r\n"
            f"MIME-Version: 1.0\r\n"
            f"Content-Type: multipart/report; report-type=delivery-status;\r\n"
            f"\tboundary=\"{boundary}\"\r\n"
        )
        body = (
            f"This is a MIME-encapsulated message.\r\n\r\n"
            f"--{boundary}\r\n"
            f"Content-Description: Notification\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n\r\n"
            f"{human}\r\n"
            f"--{boundary}\r\n"
            f"Content-Description: Delivery report\r\n"
            f"Content-Type: message/delivery-status\r\n\r\n"
            f"{status_part}"
        ).encode()
        if content is not None:
            kept = [line for line in headers.lines(orig_head)
                    if headers.field_name(line) != FAILED_HEADER.lower() and headers.field_name(line) not in _DROP_ON_REINJECT]
            body += (f"\r\n--{boundary}\r\n"
                     f"Content-Description: Undelivered Message Headers\r\n"
                     f"Content-Type: text/rfc822-headers\r\n\r\n").encode("ascii")
            body += b"\r\n".join(kept) + b"\r\n"
        body += f"\r\n--{boundary}--\r\n".encode("ascii")
        message = head_text.encode("utf-8") + b"\r\n" + body
        if self.policy.signer is not None:
            try:  # signed like our forwards, so the sender's provider can trust it
                sigs = self.policy.signer.sign(message)
                message = b"".join(f"{n}: {v}".replace("\n", "\r\n").encode("ascii") + b"\r\n"
                                   for n, v in sigs) + message
            except Exception as exc:  # noqa: BLE001 - sent unsigned, never dropped
                log.warning("final bounce: DKIM signing failed: %s", exc)
        return message


def _covered(parsed_fields: list, signed: list[bytes]) -> bytes:
    """The header fields (dkimpy's parse, in order) a signature with h=`signed` covers,
    chosen from the bottom up as verifiers do (RFC 6376 section 5.4.2, dkim.select_parsed_fields)."""
    chosen = set()
    last: dict[bytes, int] = {}
    for name in signed:
        i = last.get(name, len(parsed_fields))
        while i > 0:
            i -= 1
            if parsed_fields[i][0].lower() == name:
                chosen.add(i)
                break
        last[name] = i
    return b"".join(parsed_fields[i][0] + b":" + parsed_fields[i][1] for i in sorted(chosen))


# ------------------------------------------------------------- the CLI


def cmd_token(args) -> int:
    """`routemilter token ADDRESS`: what a bounce token says, or why it is refused."""
    from .config import load

    config = load(args.config)
    if config.srs is None or config.bounces is None:
        print("routemilter: bounces (and srs) are not configured", flush=True)
        return 1
    codec = TokenCodec(config.srs, config.bounces.max_age_days)
    address = addresses.strip_envelope(args.address)
    try:
        token = codec.check(address)
    except TokenError as exc:
        print(f"{address}: refused: {exc}")
        return 1
    every = config.all_rules()
    names = [r.name for r in every if token.rules is None or rule_id(r.name) in token.rules]
    print(f"{address}: valid")
    print(f"  original sender: {token.sender}")
    print(f"  rules: {', '.join(names) or '(none in the current config)'}")
    if token.dest is None:
        print("  copy: first fan-out (the failed recipient names the destination)")
    else:
        print(f"  copy: destination {token.dest + 1}, chain position {token.pos} (0 = primary)")
    if token.binding is None:
        print("  message: not bound (older rmb= token, accepted until it expires)")
    elif token.binding == "x":
        print("  message: not bound (the forward was not DKIM-signed)")
    else:
        print(f"  message: bound to our DKIM signature with b= digest {token.binding}")
    return 0


# ------------------------------------------------------- re-injection


class _SMTP(smtplib.SMTP):
    """smtplib.SMTP keeping the reply to DATA, which names the new queue id."""

    data_replies: list

    def data(self, msg):
        code, reply = super().data(msg)
        self.data_replies.append(reply.decode("utf-8", "replace"))
        return code, reply


def submit(hostport: str, submissions: list[Submission], timeout: float = 60) -> list[str]:
    """Hand every submission to the MTA's re-injection listener over SMTP.

    Raises on any failure (the caller answers 451 and the MTA retries the
    bounce). Postfix has queued each message once this returns. Returns the
    MTA's reply to each DATA ("2.0.0 Ok: queued as ID").
    """
    if not submissions:
        return []
    if hostport.startswith("unix:"):
        client = _UnixSMTP(hostport[len("unix:"):], timeout=timeout, local_hostname="routemilter.bounces")
    else:
        host, _, port = hostport.rpartition(":")
        client = _SMTP(host.strip("[]"), int(port), timeout=timeout, local_hostname="routemilter.bounces")
    with client as smtp:
        smtp.data_replies = []
        smtp.ehlo()
        for sub in submissions:
            options = []
            if any(b > 127 for b in sub.data) and smtp.has_extn("8bitmime"):
                options.append("BODY=8BITMIME")
            if not (sub.mail_from + sub.rcpt).isascii():
                options.append("SMTPUTF8")
            smtp.sendmail(sub.mail_from, [sub.rcpt], sub.data, mail_options=options)
        return smtp.data_replies


class _UnixSMTP(_SMTP):
    """SMTP over a unix socket (Postfix's smtpd as a master.cf `unix` service), the way
    smtplib.LMTP connects to a path."""

    def connect(self, host="localhost", port=0, source_address=None):
        import socket

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        try:
            self.sock.connect(host)
        except OSError:
            self.sock.close()
            self.sock = None
            raise
        code, msg = self.getreply()
        return code, msg


# ---------------------------------------------------------- LMTP server


class _LMTPHandler:
    def __init__(self, server: BounceServer):
        self.server = server

    async def handle_RCPT(self, smtp, session, envelope, address, rcpt_options):
        policy = self.server.holder.current
        if policy.tokens is None:
            return "550 5.1.1 routemilter: bounce handling is not configured"
        try:
            policy.tokens.check(address)
        except TokenError as exc:
            events.bounce_refused(_safe(address, 300), str(exc))
            return "550 5.1.1 routemilter: invalid or expired return address"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, smtp, session, envelope):
        data = bytes(envelope.original_content or b"")
        mail_from = envelope.mail_from or ""
        if mail_from.strip() in ("<>", ""):
            mail_from = ""  # aiosmtpd keeps the null sender as "<>"
        loop = asyncio.get_running_loop()
        replies = []
        for rcpt in envelope.rcpt_tos:
            replies.append(await loop.run_in_executor(
                None, self.server.process, rcpt, mail_from, data))
        return "\r\n".join(replies)


class BounceServer:
    """LMTP listener in the daemon for bounces to the SRS domain."""

    def __init__(self, holder, settings: BounceSettings, mode: int = 0o660, group: str | None = None,
                 submitter: Callable[[str, list[Submission]], None] = submit):
        self.holder = holder
        self.settings = settings
        self.mode = mode
        self.group = group
        self.submitter = submitter
        self.controller = None

    def process(self, rcpt: str, mail_from: str, data: bytes) -> str:
        """Handle one bounce for one token; the LMTP reply for that recipient."""
        started = time.monotonic()
        policy = self.holder.current
        ids = events.bounce_queue_ids(data)  # (this bounce, the message it reports on): joins the logs
        store = self.holder.store
        try:
            outcome = Handler(policy, store=store).handle(rcpt, mail_from, data)
        except TokenError as exc:
            events.bounce_refused(_safe(rcpt, 300), str(exc), ids)
            return "550 5.1.1 routemilter: invalid or expired return address"
        except Exception:
            log.exception("bounce rcpt=<%s> bounce_qid=%s error: tempfail", _safe(rcpt, 300), ids[0])
            events.bounce_tempfail(_safe(rcpt, 300), ids, "handler error")
            return "451 4.3.0 routemilter: temporary error handling this bounce"
        try:
            replies = self.submitter(policy.config.bounces.reinject, outcome.submissions) or []
        except Exception as exc:  # noqa: BLE001 - the MTA keeps the bounce and retries
            for key in outcome.claims:  # not done: the retry must be able to act
                try:
                    store.release(key)
                except Exception as release_exc:  # noqa: BLE001 - still 451: never a 5xx from here
                    log.error("bounce rcpt=<%s> bounce_qid=%s claim %s could not be released (%r): "
                              "the MTA's retry of this bounce will be taken for a replay",
                              _safe(rcpt, 300), ids[0], key, release_exc)
            events.bounce_tempfail(_safe(rcpt, 300), ids, f"reinject failed: {exc!r}", outcome.notes)
            return "451 4.4.1 routemilter: cannot re-inject right now, try again later"
        events.bounce(_safe(rcpt, 300), _safe(mail_from, 300), ids, outcome.notes, outcome.submissions,
                      [events.queued_as(r) for r in replies], (time.monotonic() - started) * 1000,
                      [(_normal(r.final_recipient), _safe(r.reason)) for r in parse_dsn(data).failed])
        return "250 2.0.0 routemilter: bounce handled"

    def start(self) -> BounceServer:
        from aiosmtpd.controller import Controller, UnixSocketController
        from aiosmtpd.lmtp import LMTP

        handler = _LMTPHandler(self)
        limit = self.settings.max_size
        kind, _, where = self.settings.socket.partition(":")

        # postfix-config sets lmtp_line_length_limit = 0, so returned messages keep their
        # long lines (DKIM needs them unchanged): accept lines up to the size limit, not
        # aiosmtpd's RFC 5321 default of 1,001 (it reads with that limit from __init__ on).
        long_lines = type("LongLineLMTP", (LMTP,), {"line_length_limit": max(limit, 1001)})

        def factory(controller):
            return long_lines(handler, data_size_limit=limit, enable_SMTPUTF8=True, decode_data=False,
                              hostname="routemilter-bounces", ident="routemilter", timeout=300)

        if kind in ("unix", "local"):
            os.makedirs(os.path.dirname(where), exist_ok=True)
            sockets.check_folder(where)
            if os.path.lexists(where):
                os.unlink(where)
            controller = UnixSocketController(handler, unix_socket=where)
        else:
            port, _, host = where.partition("@")
            controller = Controller(handler, hostname=host or "127.0.0.1", port=int(port))
        controller.factory = lambda: factory(controller)
        with sockets.umask_for(self.mode):  # the mode is set at bind, not by name after
            controller.start()
        self.controller = controller
        if kind in ("unix", "local"):
            try:
                sockets.finish(where, self.mode, self.group)
            except Exception:
                self.stop()
                raise
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop(no_assert=True)
            kind, _, where = self.settings.socket.partition(":")
            if kind in ("unix", "local"):
                try:
                    os.unlink(where)
                except OSError:  # gone, or no right any more after dropping privileges
                    pass
            self.controller = None
