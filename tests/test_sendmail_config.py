"""`routemilter sendmail-config`: the lines for sendmail.mc (compiled by a real
Sendmail 8.17 in integration/test_sendmail.py)."""

from routemilter.config import loads
from routemilter.mtaconfig import sendmail_config, sendmail_mc, sendmail_relay_domains
from testkit import ROUTE_ME, SRS_SECTION

BASE = """
milter:
  socket: {socket}
""" + SRS_SECTION + """\
routes:
{routes}
default_route: {default}
"""


def base(**fields: str) -> str:
    return BASE.format(**fields) + ROUTE_ME


def mc(routes="  other: [mx, \"[x.test]:25\"]", default="mx", socket="unix:/run/routemilter/rm.sock"):
    return "\n".join(sendmail_mc(loads(base(routes=routes, default=default, socket=socket))))


def test_milter_tempfails_and_gets_the_queue_id():
    text = mc()
    assert "INPUT_MAIL_FILTER(`routemilter', `S=unix:/run/routemilter/rm.sock, F=T, T=C:30s;S:1m;R:1m;E:5m')dnl" in text
    # Double quotes: the comma must survive m4 (Sendmail compiles it to "{msg_id}, i").
    assert "define(`confMILTER_MACROS_EOM', ``{msg_id}, i'')dnl" in text
    assert "unsafe" in text  # the socket-folder warning for unix sockets


def test_inet_socket_is_passed_as_is():
    text = mc(socket="inet:8894@127.0.0.1")
    assert "S=inet:8894@127.0.0.1, F=T" in text
    assert "unsafe" not in text


def test_mx_only_default_route_has_no_smart_hosts():
    text = mc()
    assert "SMART_HOST" not in text and "FALLBACK_SMARTHOST" not in text and "HOST_STATUS" not in text


def test_mx_then_relay_is_the_fallback_smarthost_with_host_status():
    text = mc(routes='  backup: [mx, "[relay-b.test]:25", "[relay-c.test]"]', default="backup")
    assert "define(`confFALLBACK_SMARTHOST', `[relay-b.test]')dnl" in text
    assert "define(`confHOST_STATUS_DIRECTORY', `/var/lib/sendmail/host_status')dnl" in text
    assert "451 4.7.650" in text  # says what the fallback smart host does not do
    assert "single fallback smart host; not used: [relay-c.test]" in text
    assert "SMART_HOST'" not in text.replace("FALLBACK_SMARTHOST", "")
    assert "WARNING" not in text


def test_fallback_port_cannot_be_expressed_and_says_so():
    text = mc(routes='  backup: [mx, "[relay-b.test]:587"]', default="backup")
    assert "define(`confFALLBACK_SMARTHOST', `[relay-b.test]')dnl" in text
    assert "WARNING" in text and "587" in text


def test_relays_only_default_route_is_a_smart_host_then_the_fallback():
    text = mc(routes='  relays: ["[relay-a.test]:2525", "relay-c.test"]', default="relays")
    assert "define(`SMART_HOST', `relay:[relay-a.test]')dnl" in text
    assert "define(`RELAY_MAILER_ARGS', `TCP $h 2525')dnl" in text
    assert "define(`confFALLBACK_SMARTHOST', `relay-c.test')dnl" in text


def test_other_routes_are_named_as_unsupported():
    text = mc(routes='  other: [mx, "[x.test]:25"]', default="mx")
    config = loads(base(routes='  other: [mx, "[x.test]:25"]', default="mx",
                               socket="unix:/run/rm.sock").replace(
        "to: [me@gmail.test]", "to: [{address: me@gmail.test, route: other}]"))
    assert "default route: other" in "\n".join(sendmail_mc(config))
    assert "default route: other" not in text  # unused routes are not mentioned


def test_relay_domains_and_full_output():
    config = loads(base(routes="  {}", default="mx", socket="unix:/run/rm.sock").replace("routes:\n  {}\n", ""))
    assert sendmail_relay_domains(config) == ["family.test", "fwd.family.test"]
    text = sendmail_config(config)
    assert text.startswith("dnl ---- sendmail.mc")
    assert text.endswith("dnl ---- /etc/mail/relay-domains ----\nfamily.test\nfwd.family.test\n")


BOUNCES = """
milter:
  socket: unix:/run/routemilter/rm.sock
""" + SRS_SECTION + """\
bounces:
  socket: {socket}
  reinject: "[127.0.0.1]:10027"
domains:
  family.test: {{}}
rules:
  - name: me
    addresses: [me@family.test]
    to: [{{address: me@gmail.test, fallback: [me@outlook.test]}}]
"""


def test_bounces_go_to_the_lmtp_handler_and_come_back_without_the_milter():
    from routemilter.mtaconfig import sendmail_mailertable, sendmail_mc_after
    config = loads(BOUNCES.format(socket="unix:/run/routemilter/bounce.sock"))
    before = "\n".join(sendmail_mc(config))
    assert "ifdef(`_MAILER_TABLE_', `', `FEATURE(`mailertable')')dnl" in before
    assert "DAEMON_OPTIONS(`Port=10027, Addr=127.0.0.1, Name=rm-reinject, InputMailFilters=')dnl" in before
    after = sendmail_mc_after(config)
    assert after[0] == "MAILER_DEFINITIONS"
    assert after[1].startswith("Mrmbounce, P=[IPC], F=mnqXz, ") and "E=\\r\\n" in after[1]
    assert after[1].endswith("A=FILE /run/routemilter/bounce.sock")
    assert sendmail_mailertable(config) == [("fwd.family.test", "rmbounce:localhost")]
    text = sendmail_config(config)
    assert "after the MAILER() lines" in text and "/etc/mail/mailertable" in text
    inet = loads(BOUNCES.format(socket="inet:8895@127.0.0.1"))
    assert sendmail_mc_after(inet)[1].endswith("A=TCP 127.0.0.1 8895")


def test_no_bounces_no_mailer():
    from routemilter.mtaconfig import sendmail_mailertable, sendmail_mc_after
    config = loads(base(routes="  {}", default="mx", socket="unix:/run/rm.sock").replace("routes:\n  {}\n", ""))
    assert sendmail_mc_after(config) == [] and sendmail_mailertable(config) == []
    assert "rm-reinject" not in sendmail_config(config)
