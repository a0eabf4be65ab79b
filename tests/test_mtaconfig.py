"""The MTA snippets generated from the YAML (checked against a real Postfix in integration/)."""

from routemilter.config import loads
from routemilter.mtaconfig import (
    milter_socket_for_postfix,
    postfix_config,
    postfix_main,
    postfix_master,
    sendmail_config,
    transport_entries,
)
from testkit import SRS_SECTION

CONFIG = """
milter:
  socket: unix:/var/spool/postfix/routemilter/routemilter.sock
""" + SRS_SECTION + """\
routes:
  backup: [mx, "[relay-b.test]:587"]
  relays-only: ["[relay-a.test]:25", "[relay-c.test]:2525"]
domains:
  family.test:
    catch_all:
      to:
        - address: all@gmail.test
          route: relays-only
rules:
  - name: me
    addresses: [me@family.test]
    to:
      - address: me@gmail.test
        fallback:
          - address: me@outlook.test
            route: backup
"""


def config():
    return loads(CONFIG)


def test_socket_inside_the_postfix_chroot_is_named_relative_to_it():
    assert milter_socket_for_postfix("unix:/var/spool/postfix/routemilter/rm.sock") == "unix:routemilter/rm.sock"
    assert milter_socket_for_postfix("unix:/run/routemilter/rm.sock") == "unix:/run/routemilter/rm.sock"
    assert milter_socket_for_postfix("inet:8894@127.0.0.1") == "inet:127.0.0.1:8894"


def test_main_cf_tempfails_when_the_milter_is_away():
    main = {name: value for name, value, _ in postfix_main(config())}
    assert main["milter_default_action"] == "tempfail"
    assert "default_action=tempfail" in main["smtpd_milters"]
    assert main["smtpd_milters"] == main["non_smtpd_milters"]
    assert main["relay_domains"] == "family.test, fwd.family.test"  # no subdomain addressing: exact
    assert "relay_domains" not in main["parent_domain_matches_subdomains"]
    assert main["disable_mime_output_conversion"] == "yes"
    assert main["transport_maps"].startswith("hash:")


def test_transport_map_covers_only_destinations_on_non_mx_routes():
    assert transport_entries(config()) == [
        ("all@gmail.test", "rm_relays_only:[relay-a.test]:25"),
        ("me@outlook.test", "rm_backup:"),  # empty next hop: the domain's MX first
    ]


def test_master_cf_has_one_transport_per_route_with_fallback_relays():
    lines = postfix_master(config())
    text = "\n".join(lines)
    assert "rm_backup unix - - n - - smtp" in lines
    assert "  -o smtp_fallback_relay=[relay-b.test]:587" in lines
    assert "rm_relays_only unix - - n - - smtp" in lines
    assert "  -o smtp_fallback_relay=[relay-c.test]:2525" in lines
    assert "rm_mx" not in text  # plain MX delivery needs no transport


def test_full_postfix_output_has_all_three_parts():
    text = postfix_config(config())
    assert "# ---- main.cf" in text and "# ---- master.cf" in text and "postmap" in text


def test_sendmail_tempfails_when_the_milter_is_away():
    text = sendmail_config(config())
    assert "INPUT_MAIL_FILTER(`routemilter', `S=unix:/var/spool/postfix/routemilter/routemilter.sock, F=T" in text
    assert "fwd.family.test" in text
