"""Header blocks as bytes: the one place that splits a CRLF header block into fields.

The milter collects headers as (name, value) pairs; the bounce handler, the deferral
listener, the From rewrite, DKIM signing and ARC sealing work on raw header blocks
(`Name: value\r\n...`). A field keeps its continuation lines; an empty line ends
nothing here (a block holds no body)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol


def fields(block: bytes) -> list[bytes]:
    """The fields of a CRLF header block, each with its continuation lines and final CRLF."""
    out: list[bytes] = []
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += line + b"\r\n"
        else:
            out.append(line + b"\r\n")
    return out


def lines(block: bytes) -> list[bytes]:
    """The fields of a CRLF header block without their final CRLF."""
    return [field[:-2] for field in fields(block)]


def field_name(field: bytes) -> str:
    """The lower-case name of a field (`Subject: x` -> `subject`)."""
    return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


class HeaderPlan(Protocol):
    """What forwarded() reads of a session Plan."""

    headers: list[tuple[str, str]]  # prepended, first on top (addheader at index 0, last first)
    changes: list[tuple[str, int, str]]  # chgheader(name, index, value): "" deletes


def _wire(text: str) -> bytes:
    """A field or value as written for libmilter (folds as bare LF) in CRLF form."""
    return text.replace("\n", "\r\n").encode("utf-8", "replace")


def forwarded(block: bytes | bytearray, plan: HeaderPlan, skip: Collection[str] = ()) -> bytes:
    """The header block as the MTA passes it on once `plan` is applied: the changes first,
    in order (the index-th field of that name gets the value; an empty value deletes it),
    then the added fields on top. Added fields named in `skip` (lower case) are left out.

    DKIM signing and ARC sealing both sign this, never a block rewritten in place."""
    out = fields(bytes(block))
    for name, index, value in plan.changes:
        lname = name.lower()
        seen = 0
        for i, field in enumerate(out):
            if field_name(field) == lname:
                seen += 1
                if seen == index:
                    if value:
                        out[i] = field.split(b":", 1)[0] + b": " + _wire(value) + b"\r\n"
                    else:
                        del out[i]
                    break
    added = [_wire(f"{n}: {v}") + b"\r\n" for n, v in plan.headers if n.lower() not in skip]
    return b"".join(added + out)
