#!/bin/sh
# packaging/build-deb.sh: build dist/eqmail_VERSION_all.deb with debhelper
# and dh-python (pybuild's pyproject plugin) and Debian's own python3.
#
#   packaging/build-deb.sh [--lintian]
#
# The source tree (the files git knows of, or the whole checkout without
# build products when there is no git) is exported to build/deb/eqmail-VERSION/,
# packaging/debian/ becomes its debian/ (with init/eqmaild and
# init/eqmaild.default as debian/eqmail.eqmaild.init and .default), and
# dpkg-buildpackage -us -uc -b runs there; its products land in build/deb/,
# the .deb is copied to dist/.  Nothing is written outside the checkout.
#
# As root, missing build dependencies are installed with apt-get; otherwise
# they must be there: debhelper dh-python pybuild-plugin-pyproject
# python3-all python3-setuptools python3-build python3-installer
# python3-wheel fakeroot (and lintian for --lintian).
set -eu
cd "$(dirname "$0")/.."
top=$(pwd)

lintian=""
[ "${1:-}" = --lintian ] && lintian=1

# PATH: Debian's tools and python3 only.  A pyenv (or venv) python3 earlier
# on PATH makes pybuild fail with "No module named build" (or build against
# the wrong interpreter).
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV 2>/dev/null || true

deps="debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-build python3-installer python3-wheel fakeroot"
[ -n "$lintian" ] && deps="$deps lintian"
missing=""
for p in $deps; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "build-deb.sh: installing$missing" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    else
        echo "build-deb.sh: missing build dependencies:$missing" >&2
        echo "  sudo apt-get install -y --no-install-recommends$missing" >&2
        exit 1
    fi
fi

version=$(/usr/bin/python3 -c '
import re
text = open("eqmail/__init__.py", encoding="utf-8").read()
print(re.search(r"(?m)^__version__\s*=\s*\"([^\"]+)\"", text).group(1))')
changelog_version=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
if [ "$changelog_version" != "$version" ]; then
    echo "build-deb.sh: packaging/debian/changelog is at $changelog_version, eqmail/__init__.py at $version" >&2
    exit 1
fi

out=build/deb
src=$out/eqmail-$version
rm -rf "$out"
mkdir -p "$src" dist

# export the tree
if command -v git >/dev/null 2>&1 && git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard -- . ':!packaging/debian' |
        xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done; true' sh |
        tar --null -T - -cf - | tar -xf - -C "$src"
else
    tar --exclude=./build --exclude=./dist --exclude=./.git --exclude=./.venv \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude=./eqmail-home \
        --exclude=./packaging/debian -cf - . | tar -xf - -C "$src"
fi
cp -a packaging/debian "$src/debian"
cp init/eqmaild "$src/debian/eqmail.eqmaild.init"
cp init/eqmaild.default "$src/debian/eqmail.eqmaild.default"
chmod 755 "$src/debian/rules"

start=$(date +%s)
(cd "$src" && dpkg-buildpackage -us -uc -b)
echo "build-deb.sh: dpkg-buildpackage took $(( $(date +%s) - start )) s" >&2

deb=$out/eqmail_${version}_all.deb
[ -f "$deb" ] || { echo "build-deb.sh: $deb was not built" >&2; exit 1; }
rm -f dist/eqmail_*.deb
cp "$deb" dist/
echo "built: dist/$(basename "$deb")"

if [ -n "$lintian" ]; then
    lintian --pedantic -I --no-tag-display-limit "$out"/eqmail_*.changes || true
fi
