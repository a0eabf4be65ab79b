"""Priorities for lines on stderr that systemd's journal reads.

Under systemd, stderr is a stream to journald and every line lands at the unit's
SyslogLevel (info): `journalctl -p err` would find nothing. A line starting
with "<N>" (sd-daemon(3), honoured with SyslogLevelPrefix=yes, the default) is
logged at syslog priority N instead. The prefix is added only when stderr *is*
that stream (JOURNAL_STREAM names its device and inode, systemd.exec(5)), so a
terminal or a pipe sees plain lines.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

# sd-daemon.h: SD_ERR "<3>", SD_WARNING "<4>", SD_INFO "<6>", SD_DEBUG "<7>"
ERR, WARNING, INFO, DEBUG = 3, 4, 6, 7
_LEVELS = {logging.CRITICAL: 2, logging.ERROR: ERR, logging.WARNING: WARNING, logging.INFO: INFO,
           logging.DEBUG: DEBUG}


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def prefix(priority: int) -> str:
    """"<N>" when stderr goes to the journal, else ""."""
    return f"<{priority}>" if stderr_is_journal() else ""


def syslog_priority(levelno: int) -> int:
    for level in sorted(_LEVELS, reverse=True):
        if levelno >= level:
            return _LEVELS[level]
    return DEBUG


class JournalFormatter(logging.Formatter):
    """Each line of a record (a traceback has several) gets the record's priority."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tag = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(tag + line for line in text.split("\n"))
