#!/bin/sh
# Build dist/eqmail_VERSION-1_all.ipk (OpenWrt 24.10, opkg) and dist/eqmail.pyz
# from this checkout, without the OpenWrt SDK.  See build_ipk.py for what goes
# into them; extra arguments go to it (--outdir DIR, --release N,
# --python-version 3.N, --no-pyz).
#
# Reproducible: file times are SOURCE_DATE_EPOCH, by default the time of the
# last git commit (0 outside git), so two builds of one tree are identical.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
	SOURCE_DATE_EPOCH=$(git -C "$top" log -1 --format=%ct 2>/dev/null || echo 0)
fi
export SOURCE_DATE_EPOCH
exec "${PYTHON:-python3}" "$here/build_ipk.py" --outdir "$top/dist" "$@"
