"""Header blocks as bytes: the one place that splits a CRLF header block into fields.

The milter collects headers as (name, value) pairs; the bounce handler, the deferral
listener and the From rewrite work on raw header blocks (`Name: value\r\n...`). A field
keeps its continuation lines; an empty line ends nothing here (a block holds no body)."""

from __future__ import annotations


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


def replace_field(block: bytes, lname: bytes, value: bytes) -> bytearray:
    """`block` with the first field named `lname` (lower case) given a new value."""
    out = bytearray()
    done = False
    for field in fields(block):
        if not done and field.split(b":", 1)[0].strip().lower() == lname:
            out += field.split(b":", 1)[0] + b": " + value + b"\r\n"
            done = True
        else:
            out += field
    return out


def without_fields(block: bytes, lname: bytes, indexes: list[int]) -> bytes:
    """`block` without the given 1-based occurrences of the field named `lname`."""
    if not indexes:
        return block
    out = bytearray()
    seen = 0
    for field in fields(block):
        if field.split(b":", 1)[0].strip().lower() == lname:
            seen += 1
            if seen in indexes:
                continue
        out += field
    return bytes(out)
