#!/bin/sh
# Build dist/routemilter_VERSION-1_ARCH.deb with Debian's own tools (python3-venv,
# python3-pip and python3-setuptools 66 from the distro, dpkg-deb), the way
# dh-virtualenv does it: the daemon and its Python dependencies in a private venv
# under /opt/routemilter, so the system Python is left alone (PEP 668).
#
# Build needs (Debian 12): python3-venv python3-pip python3-wheel python3-dev gcc
# libmilter-dev (pymilter is a C extension) dpkg-dev. Wheels come from the pip index;
# the .deb needs no network to install. Run time: python3 (3.11) and libmilter1.0.1.
set -eu
cd "$(dirname "$0")/.."
PY=/usr/bin/python3                       # the interpreter the package runs on
VERSION=$($PY -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
REVISION=${REVISION:-1}
ARCH=$(dpkg --print-architecture)
PYVER=$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
NEXTPY=$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
OUT=dist/routemilter_${VERSION}-${REVISION}_${ARCH}.deb
WORK=$(pwd)/build/deb
ROOT=$WORK/root
VENV=$ROOT/opt/routemilter

# The wheelhouse is kept between builds (dependencies fetched once), but never our own
# wheel: a stale one (same version, older metadata) would be installed instead.
rm -rf "$ROOT" "$WORK/src" "$WORK/dist" "$WORK"/wheelhouse/routemilter-*.whl
mkdir -p "$ROOT/DEBIAN" "$WORK/wheelhouse" "$WORK/dist" dist

# 1. routemilter's own wheel with the distro's setuptools (no build isolation), from
#    a copy of the tracked tree (building writes build/ and *.egg-info into it).
mkdir -p "$WORK/src"
git ls-files -z --cached --others --exclude-standard | grep -zv '^build/' | tar --null -T - -cf - | tar -C "$WORK/src" -xf -
$PY -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src"

# 2. The venv, populated from wheels (dependencies built or fetched once into the
#    wheelhouse; pymilter compiles here against libmilter-dev).
$PY -m venv "$VENV"
WHEEL=$(ls "$WORK"/dist/routemilter-*.whl)
# [redis]: redis-py (pure Python) for `state: backend: redis` (docs/multi-host.md);
# [auth]: pyspf, dmarc, authres for the auth: section (docs/deliverability.md): a packaged install has auth:.
"$VENV/bin/pip" wheel -q -w "$WORK/wheelhouse" "$WHEEL[redis,auth]"
"$VENV/bin/pip" install -q --no-compile --no-index --find-links "$WORK/wheelhouse" "$WHEEL[redis,auth]"
"$VENV/bin/pip" uninstall -q -y pip setuptools   # nothing installs into it after the build
rm -f "$VENV"/bin/activate* "$VENV"/bin/Activate.ps1
# The venv was made at $VENV: its scripts must name /opt/routemilter instead.
for f in "$VENV"/bin/*; do
    [ -f "$f" ] && [ ! -L "$f" ] && sed -i "1s|^#!$VENV/|#!/opt/routemilter/|" "$f"
done
sed -i "s|$VENV|/opt/routemilter|" "$VENV/pyvenv.cfg"
if grep -rlI --exclude-dir=__pycache__ "$VENV" "$VENV" | grep -v '/direct_url.json$' | grep -v '/RECORD$'; then
    echo "build-deb: files above still name the build folder" >&2; exit 1
fi
find "$VENV" -name direct_url.json -delete
# Byte-compile now: the service runs with /opt read-only (ProtectSystem=strict).
$PY -m compileall -q -j 0 -s "$ROOT" -p / "$VENV/lib"

# 3. The rest of the filesystem.
install -d "$ROOT/usr/sbin"
ln -s /opt/routemilter/bin/routemilter "$ROOT/usr/sbin/routemilter"
install -D -m 0644 systemd/routemilter.service "$ROOT/lib/systemd/system/routemilter.service"
install -D -m 0644 systemd/routemilter.sysusers "$ROOT/usr/lib/sysusers.d/routemilter.conf"
install -D -m 0644 systemd/routemilter.tmpfiles "$ROOT/usr/lib/tmpfiles.d/routemilter.conf"
install -d -m 0750 "$ROOT/etc/routemilter"
install -m 0640 conf/routemilter.yaml "$ROOT/etc/routemilter/routemilter.yaml"
DOC=$ROOT/usr/share/doc/routemilter
install -d "$DOC/examples"
install -m 0644 README.md "$DOC/"
install -d "$DOC/docs"
install -m 0644 docs/*.md "$DOC/docs/"
install -m 0644 conf/examples/*.yaml "$DOC/examples/"
{ echo "routemilter is licensed under the MIT license:"; echo; cat LICENSE; } > "$DOC/copyright"
for page in man/*.[1-8]; do
    section=${page##*.}
    install -D -m 0644 "$page" "$ROOT/usr/share/man/man$section/$(basename "$page")"
    gzip -9n "$ROOT/usr/share/man/man$section/$(basename "$page")"
done

# 4. Control files.
install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$ROOT/DEBIAN/"
echo /etc/routemilter/routemilter.yaml > "$ROOT/DEBIAN/conffiles"
SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
sed -e "s/@VERSION@/$VERSION-$REVISION/" -e "s/@ARCH@/$ARCH/" -e "s/@SIZE@/$SIZE/" \
    -e "s/@PYVER@/$PYVER/" -e "s/@NEXTPY@/$NEXTPY/" packaging/debian/control > "$ROOT/DEBIAN/control"
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$OUT" >/dev/null
echo "$OUT"
