"""routemilter: a mail-routing milter for Postfix and Sendmail."""

__version__ = "0.1.0"
