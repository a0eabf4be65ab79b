"""Envelope address parsing: accepted shapes, the normal form, every refusal, and
property tests (no crash on any text, the normal form is a fixed point)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routemilter.addresses import (
    MAX_ADDRESS,
    MAX_DOMAIN,
    MAX_LOCAL,
    Address,
    AddressError,
    is_null_sender,
    normalize,
    parse,
    parse_domain,
    strip_envelope,
)

# ------------------------------------------------------------ accepted shapes


@pytest.mark.parametrize(
    "raw, local, domain",
    [
        ("user@example.com", "user", "example.com"),
        ("<user@example.com>", "user", "example.com"),
        ("  < user@example.com >  ", "user", "example.com"),
        ("User.Name@Example.COM", "user.name", "example.com"),
        ("user@example.com.", "user", "example.com"),  # the root dot
        ("<@relay.example:user@example.com>", "user", "example.com"),  # source route
        ("<@a.example,@b.example:User@Example.com>", "user", "example.com"),
        ("me+shop@family.example", "me+shop", "family.example"),
        ("anything@kid.family.example", "anything", "kid.family.example"),
        ('"john doe"@example.com', '"john doe"', "example.com"),
        ('"a@b"@example.com', '"a@b"', "example.com"),  # '@' inside quotes: the last '@' splits
        ("postmaster@[192.0.2.1]", "postmaster", "[192.0.2.1]"),  # address literal
        ("jörg@bücher.example", "jörg", "bücher.example"),  # SMTPUTF8
        ("a@x-y.example", "a", "x-y.example"),
    ],
)
def test_accepted_shapes_and_normal_form(raw, local, domain):
    address = parse(raw)
    assert address == Address(local, domain)
    assert str(address) == f"{local}@{domain}"
    assert normalize(raw) == f"{local}@{domain}"


def test_strip_envelope():
    assert strip_envelope(" <a@b> ") == "a@b"
    assert strip_envelope("<@r1,@r2:a@b>") == "a@b"
    assert strip_envelope("a@b") == "a@b"
    assert strip_envelope("<>") == ""


@pytest.mark.parametrize("raw", ["<>", "", "  <  >  ", "< >"])
def test_null_sender(raw):
    assert is_null_sender(raw)


@pytest.mark.parametrize("raw", ["<a@b.example>", "a@b.example", "<postmaster>"])
def test_not_null_sender(raw):
    assert not is_null_sender(raw)


def test_local_part_limit_is_64_unquoted_and_66_with_quotes():
    assert parse("a" * MAX_LOCAL + "@d.example").local == "a" * MAX_LOCAL
    with pytest.raises(AddressError, match="local part longer than 64"):
        parse("a" * (MAX_LOCAL + 1) + "@d.example")
    quoted = '"' + "a" * MAX_LOCAL + '"'
    assert parse(quoted + "@d.example").local == quoted
    with pytest.raises(AddressError, match="local part longer than 64"):
        parse('"' + "a" * (MAX_LOCAL + 1) + '"@d.example')


def test_domain_label_limits():
    label = "a" * 63
    assert parse(f"u@{label}.example").domain == f"{label}.example"
    with pytest.raises(AddressError, match="label longer than 63"):
        parse(f"u@{label}a.example")


def test_total_length_limit():
    # 4 labels of 63 + 3 dots = 255: the longest domain; with a 64-char local part the
    # address is 320 characters, exactly the limit.
    domain = ".".join(["d" * 63] * 4)
    assert len(domain) == MAX_DOMAIN
    address = "l" * MAX_LOCAL + "@" + domain
    assert len(address) == MAX_ADDRESS
    assert str(parse(address)) == address
    with pytest.raises(AddressError, match="longer than 320"):
        parse(address + "x")


def test_lowercasing_that_lengthens_is_checked_after_lowercasing():
    # U+0130 lowercases to two characters; the normal form must obey the limits too,
    # or it would not parse again.
    raw = "\u0130" * 40 + "@d.example"  # 40 characters, 80 once lowercased
    with pytest.raises(AddressError, match="local part longer than 64"):
        parse(raw)
    ok = "\u0130" * 32 + "@d.example"  # exactly 64 once lowercased
    assert len(parse(ok).local) == 64


# --------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "raw, reason",
    [
        (None, "address is not text"),
        (b"a@b.example", "address is not text"),
        ("", "empty address"),
        ("<>", "empty address"),
        ("   ", "empty address"),
        ("a" * 321, "address longer than 320 characters"),
        ("a\x00b@d.example", "control character"),
        ("a@d.example\r\nRCPT TO:<x@evil.example>", "control character"),
        ("a\nb@d.example", "control character"),
        ("a\tb@d.example", "control character"),
        ("a\x7f@d.example", "control character"),
        ("a\x85b@d.example", "control character"),  # C1 (NEL)
        ("a\u2028b@d.example", "control character"),  # line separator
        ("postmaster", "address has no domain"),
        ("@d.example", "empty local part"),
        ("<@relay.example:@d.example>", "empty local part"),
        ('"abc@d.example', "unbalanced quotes"),
        ('abc"@d.example', "unbalanced quotes"),
        ('"@d.example', "unbalanced quotes"),
        ("john doe@d.example", "space or '@' in an unquoted local part"),
        ("a@b@d.example", "space or '@' in an unquoted local part"),
        ("a\u00a0b@d.example", "space or '@' in an unquoted local part"),  # no-break space
        ("<@relay.example:\u3000a@d.example>", "space or '@' in an unquoted local part"),
        ("a@", "empty domain"),
        ("a@.", "empty domain"),
        ("a@d..example", "empty label in domain"),
        ("a@.d.example", "empty label in domain"),
        ("a@" + "x" * 64 + ".example", "domain label longer than 63 characters"),
        ("a@" + ".".join(["d" * 60] * 5), "domain longer than 255 characters"),
        ("a@-d.example", "starts or ends with '-'"),
        ("a@d-.example", "starts or ends with '-'"),
        ("a@d_x.example", "invalid character '_' in domain"),
        ("a@d!.example", "invalid character '!' in domain"),
        ("a@d.example>", "invalid character '>' in domain"),
        ("<<a@d.example>>", "invalid character '>' in domain"),
        ("a@d\u00a0.example", "invalid character '\\xa0' in domain"),
        ("a@d.example\u00a0.", "invalid character '\\xa0' in domain"),
    ],
)
def test_refused(raw, reason):
    with pytest.raises(AddressError) as info:
        parse(raw)
    assert reason in str(info.value)


def test_address_error_is_a_value_error():
    assert issubclass(AddressError, ValueError)


def test_parse_domain():
    assert parse_domain(" Family.Example. ") == "family.example"
    assert parse_domain("[192.0.2.1]") == "[192.0.2.1]"
    with pytest.raises(AddressError, match=r"^'bad_domain\.example': invalid character '_'"):
        parse_domain("bad_domain.example")
    with pytest.raises(AddressError, match=r"^'': empty domain"):
        parse_domain("")


# ------------------------------------------------------------ properties

ATOM = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~."
local_parts = st.text(alphabet=ATOM, min_size=1, max_size=MAX_LOCAL)
labels = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)
valid_addresses = st.builds(lambda local, d: f"{local}@{d}", local_parts, domains)
# Text that looks like addresses often enough to reach the deep branches.
addressy = st.text(alphabet=ATOM + '@<>":,[] \t\r\n\x00\x85\u00a0\u0130\u2028ßéü', max_size=80)
# Envelope-shaped text whose parts carry the awkward characters: Unicode spaces,
# characters that grow when lowercased, quotes, a source route, a root dot.
ODD = ' "\u00a0\u3000\u0130\u212aßé_'
structured = st.builds(
    lambda route, local, domain, dot, brackets: (
        ("<{}>" if brackets else "{}").format(f"{route}{local}@{domain}{dot}")
    ),
    st.sampled_from(["", "@relay.example:"]),
    st.text(alphabet=ATOM + ODD, min_size=1, max_size=70),
    st.text(alphabet=string.ascii_letters + string.digits + "-." + ODD, min_size=1, max_size=70),
    st.sampled_from(["", "."]),
    st.booleans(),
)
any_text = st.one_of(st.text(max_size=400), addressy, structured, valid_addresses)


@settings(max_examples=1500)
@given(any_text)
def test_parse_only_ever_raises_address_error(raw):
    try:
        address = parse(raw)
    except AddressError:
        return
    # When it parses, the result is in normal form and within the limits.
    text = str(address)
    assert address.domain == address.domain.lower()
    assert not address.domain.endswith(".")
    assert len(text) <= MAX_ADDRESS
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)


@settings(max_examples=1500)
@given(any_text)
def test_normal_form_is_a_fixed_point(raw):
    try:
        once = normalize(raw)
    except AddressError:
        return
    assert normalize(once) == once
    assert parse(once) == parse(raw)


@given(valid_addresses)
def test_valid_addresses_always_parse(raw):
    address = parse(raw)
    local, domain = raw.rsplit("@", 1)
    assert address == Address(local.lower(), domain.lower())


@given(valid_addresses, st.sampled_from(["<{}>", " {} ", "< {} >", "<@relay.example:{}>"]),
       st.booleans())
def test_envelope_shape_and_case_do_not_change_the_normal_form(raw, shape, upper):
    variant = shape.format(raw.upper() if upper else raw)
    assert normalize(variant) == normalize(raw)
