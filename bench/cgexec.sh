#!/bin/sh
# cgexec.sh PROCS_FILE... -- COMMAND [ARG...]
# Writes this shell's PID into each cgroup.procs file named (so that it is
# inside those control groups before anything else runs), then execs COMMAND
# in its place: COMMAND and every process it starts are born in the groups.
# Used by bench/cgroups.py (Cgroup.wrap); run as root.
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
    echo $$ > "$1" || { echo "cgexec.sh: cannot join $1" >&2; exit 111; }
    shift
done
[ "$1" = "--" ] && shift
exec "$@"
