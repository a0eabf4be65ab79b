"""sockets.parse: the one reader of socket strings (milter, bounce, sender-map sockets,
the re-injection and deferral listeners)."""

import pytest

from routemilter import sockets
from routemilter.mtaconfig import milter_socket_for_postfix, sendmail_milter_socket
from routemilter.sockets import SocketAddress


@pytest.mark.parametrize(("text", "expected"), [
    ("unix:/run/rm.sock", SocketAddress("unix", path="/run/rm.sock")),
    ("local:/run/rm.sock", SocketAddress("unix", path="/run/rm.sock")),
    ("inet:8891", SocketAddress("inet", port=8891)),
    ("inet:8891@127.0.0.1", SocketAddress("inet", host="127.0.0.1", port=8891)),
    ("inet:8891@mail.example", SocketAddress("inet", host="mail.example", port=8891)),
    ("inet6:8891@[::1]", SocketAddress("inet6", host="::1", port=8891)),
    ("inet6:8891@::1", SocketAddress("inet6", host="::1", port=8891)),
    ("127.0.0.1:10027", SocketAddress("inet", host="127.0.0.1", port=10027, hostport=True)),
    ("[::1]:10027", SocketAddress("inet", host="::1", port=10027, hostport=True)),
    ("localhost:25", SocketAddress("inet", host="localhost", port=25, hostport=True)),
])
def test_parse(text, expected):
    assert sockets.parse(text) == expected
    assert sockets.parse(text).unix is (expected.kind == "unix")


@pytest.mark.parametrize(("text", "reason"), [
    ("unix:relative.sock", "absolute path"),
    ("unix:/", "absolute path"),
    ("local:", "absolute path"),
    ("inet:port", "port must be"),
    ("inet:0@127.0.0.1", "port must be"),
    ("inet:65536", "port must be"),
    ("inet:8891@", "not a host"),
    ("inet:8891@bad host", "not a host"),
    ("127.0.0.1:99999", "port must be"),
    ("127.0.0.1:", "port must be"),
    ("/run/rm.sock", "is not unix:/PATH"),
    ("5", "is not unix:/PATH"),
    (":25", "is not unix:/PATH"),
])
def test_parse_refuses(text, reason):
    with pytest.raises(ValueError, match=reason):
        sockets.parse(text)


def test_mta_spellings():
    """What Postfix and Sendmail are told, from each spelling."""
    assert milter_socket_for_postfix("local:/var/spool/postfix/rm/m.sock") == "unix:rm/m.sock"
    assert milter_socket_for_postfix("unix:/run/rm.sock") == "unix:/run/rm.sock"
    assert milter_socket_for_postfix("inet:8891") == "inet:127.0.0.1:8891"
    assert sendmail_milter_socket("local:/run/rm.sock") == "unix:/run/rm.sock"
    assert sendmail_milter_socket("inet:8891@127.0.0.1") == "inet:8891@127.0.0.1"
