#!/bin/sh
# Install what routemilter's demo and tests need on a Debian 12 machine:
# Debian packages (only the missing ones) and a virtual environment in .venv.
set -eu
cd "$(dirname "$0")/.."

# redis-server: the tests start their own (unix socket or free loopback port), never the system one.
PACKAGES="postfix libmilter-dev miltertest opendkim opendkim-tools swaks podman runc debootstrap libmail-dkim-perl redis-server"
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    [ "$(id -u)" = 0 ] && SUDO="" || SUDO="sudo"
    echo "installing Debian packages:$missing"
    $SUDO apt-get update -qq
    # Postfix asks what kind of server it is; the tests run their own instances.
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch .venv/.installed
fi
