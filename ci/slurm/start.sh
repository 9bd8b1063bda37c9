#!/usr/bin/env bash
# Install (apt) and start a single-node Slurm cluster on this Debian machine, for tests/test_slurm.py:
# munge, MariaDB + slurmdbd (submitit polls sacct), slurmctld and slurmd; one node with this machine's CPUs and
# memory, a preemptible partition `debug` (the default; PreemptMode=REQUEUE, GraceTime) and a higher-priority `high`.
#
#   sudo ci/slurm/start.sh      # idempotent: a second run starts nothing and checks that sinfo answers
#   sudo ci/slurm/stop.sh       # stops the daemons this script started (their pids are in /run/ddpm-slurm/pids)
#
# Needs root and Debian's slurm-wlm 22.05 packages (slurmctld slurmd slurm-client slurmdbd munge mariadb-server).
# Exit status 0 when sinfo answers at the end, 1 otherwise (the reason is the last line, also written to
# /run/ddpm-slurm/failed, which tests/test_slurm.py quotes when it skips). Logs: /var/log/ddpm-slurm/.
# Environment: DDPM_SLURM_GRACE (GraceTime of `debug`, s, default 30), DDPM_SLURM_KILL_WAIT (s, default 10).
set -uo pipefail

RUN=/run/ddpm-slurm
LOG=/var/log/ddpm-slurm
SPOOL=/var/spool/ddpm-slurm
ETC=/etc/slurm
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
GRACE="${DDPM_SLURM_GRACE:-30}"
KILL_WAIT="${DDPM_SLURM_KILL_WAIT:-10}"
CRED_EXPIRE=5
START=$(date +%s.%N)

say() { echo "slurm: $*"; }
fail() {
    mkdir -p "$RUN" 2>/dev/null && echo "$*" > "$RUN/failed" 2>/dev/null
    echo "slurm: cannot start the test cluster: $*" >&2
    exit 1
}
elapsed() { awk -v s="$START" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
pid_of() { [ -s "$RUN/$1.pid" ] && cat "$RUN/$1.pid"; }
# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s
wait_for() {
    local limit=$1 what=$2
    shift 2
    local deadline=$(( $(date +%s) + limit ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -ge "$deadline" ] && return 1
        sleep 0.2
    done
    say "$what ($(elapsed) s)"
}
cluster_answers() {
    timeout 10 sinfo -h -o '%P %a %t' 2>/dev/null | grep -Eq '^debug\* up (idle|mix|alloc)' \
        && timeout 10 sacct -n -X -S now-1minutes >/dev/null 2>&1
}
record() {  # record NAME PID: the pid of a daemon this script started
    echo "$2" > "$RUN/$1.pid"
    { grep -v "^$1 " "$RUN/pids" 2>/dev/null; echo "$1 $2"; } > "$RUN/pids.tmp" && mv "$RUN/pids.tmp" "$RUN/pids"
}

[ "$(id -u)" = 0 ] || fail "needs root (it installs packages and starts daemons); run: sudo $0"
mkdir -p "$RUN" "$LOG" "$SPOOL/ctld" "$SPOOL/d" || fail "cannot create $RUN, $LOG or $SPOOL"
rm -f "$RUN/failed"

if command -v sinfo >/dev/null && cluster_answers; then
    say "already running; nothing started ($(elapsed) s):"
    sinfo
    exit 0
fi

# --- packages -------------------------------------------------------------------------------------------------------
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null || fail "no apt-get: install ${missing[*]} by hand"
    say "installing ${missing[*]} ..."
    # Packages must not start their own daemons (no init system here; this script starts and records them).
    policy=/usr/sbin/policy-rc.d
    had_policy=0
    [ -e "$policy" ] && had_policy=1
    [ "$had_policy" = 1 ] || { printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy"; }
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            -o Dpkg::Options::=--force-unsafe-io -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "${missing[@]}" > "$LOG/apt.log" 2>&1
    }
    if ! apt_install; then
        say "apt-get install failed; apt-get update and once more"
        apt-get update -q >> "$LOG/apt.log" 2>&1
        apt_install
    fi
    status=$?
    [ "$had_policy" = 1 ] || rm -f "$policy"
    [ "$status" = 0 ] || fail "apt-get install ${missing[*]} failed (see $LOG/apt.log: $(tail -n 1 "$LOG/apt.log"))"
    say "installed ($(elapsed) s)"
fi

# --- munge ----------------------------------------------------------------------------------------------------------
if ! alive "$(pid_of munged)"; then
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        (command -v mungekey >/dev/null && mungekey --create --keyfile=/etc/munge/munge.key) \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge 2>/dev/null
    chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid >> "$LOG/munged.log" 2>&1 \
        || fail "munged did not start (see $LOG/munged.log)"
    wait_for 10 "munged up" test -s /run/munge/munged.pid || fail "munged wrote no pid file"
    record munged "$(cat /run/munge/munged.pid)"
fi
munge -n | unmunge >/dev/null 2>&1 || fail "munge -n | unmunge fails (see $LOG/munged.log)"

# --- MariaDB --------------------------------------------------------------------------------------------------------
DB_SOCKET=/run/mysqld/mysqld.sock
if ! alive "$(pid_of mariadbd)"; then
    mkdir -p /run/mysqld "$LOG/mysql" && chown mysql:mysql /run/mysqld "$LOG/mysql"  # mariadbd runs as mysql
    if [ ! -d /var/lib/mysql/mysql ]; then
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db > "$LOG/mariadb-install.log" 2>&1 \
            || fail "mariadb-install-db failed (see $LOG/mariadb-install.log)"
    fi
    setsid nohup mariadbd --user=mysql --datadir=/var/lib/mysql --socket="$DB_SOCKET" --skip-networking \
        --pid-file=/run/mysqld/ddpm-mariadbd.pid --innodb-buffer-pool-size=64M --innodb-flush-log-at-trx-commit=2 \
        --log-error="$LOG/mysql/mariadbd.log" < /dev/null > /dev/null 2>&1 &
    record mariadbd $!
    wait_for 60 "MariaDB up" mariadb-admin --socket="$DB_SOCKET" ping \
        || fail "MariaDB did not answer (see $LOG/mysql/mariadbd.log)"
fi
DB_PASS_FILE=/etc/slurm/.ddpm-db-pass
mkdir -p "$ETC"
[ -s "$DB_PASS_FILE" ] || (umask 077 && head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DB_PASS_FILE")
DB_PASS=$(cat "$DB_PASS_FILE")
mariadb --socket="$DB_SOCKET" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || fail "cannot create the slurm database user"

# --- configuration --------------------------------------------------------------------------------------------------
NODE=$(hostname -s)
NODE_LINE=$(slurmd -C 2>/dev/null | head -n 1)   # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
case "$NODE_LINE" in NodeName=*) ;; *) fail "slurmd -C did not describe this node: $NODE_LINE" ;; esac
CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<< "$NODE_LINE")
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<< "$NODE_LINE")
render() {
    sed -e "s|@NODE@|$NODE|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEM@|$MEM|g" -e "s|@GRACE@|$GRACE|g" \
        -e "s|@KILL_WAIT@|$KILL_WAIT|g" -e "s|@CRED_EXPIRE@|$CRED_EXPIRE|g" -e "s|@SPOOL@|$SPOOL|g" \
        -e "s|@RUN@|$RUN|g" -e "s|@LOG@|$LOG|g" -e "s|@NODE_LINE@|$NODE_LINE|g" -e "s|@DB_PASS@|$DB_PASS|g" "$1"
}
render "$HERE/slurm.conf.in" > "$ETC/slurm.conf"
(umask 077 && render "$HERE/slurmdbd.conf.in" > "$ETC/slurmdbd.conf")
chmod 0644 "$ETC/slurm.conf"
chmod 0600 "$ETC/slurmdbd.conf"

# --- slurmdbd, slurmctld, slurmd ------------------------------------------------------------------------------------
if ! alive "$(pid_of slurmdbd.daemon)"; then
    setsid nohup slurmdbd -D < /dev/null >> "$LOG/slurmdbd.out" 2>&1 &
    record slurmdbd.daemon $!
    wait_for 60 "slurmdbd up" sacctmgr -n list cluster || fail "slurmdbd did not answer (see $LOG/slurmdbd.log)"
fi
sacctmgr -n -P list cluster format=cluster | grep -qx ddpm || sacctmgr -i add cluster ddpm > /dev/null \
    || fail "sacctmgr add cluster ddpm failed"
if ! alive "$(pid_of slurmctld.daemon)"; then
    setsid nohup slurmctld -D < /dev/null >> "$LOG/slurmctld.out" 2>&1 &
    record slurmctld.daemon $!
    wait_for 60 "slurmctld up" scontrol ping || fail "slurmctld did not answer (see $LOG/slurmctld.log)"
fi
if ! alive "$(pid_of slurmd.daemon)"; then
    setsid nohup slurmd -D -N "$NODE" < /dev/null >> "$LOG/slurmd.out" 2>&1 &
    record slurmd.daemon $!
fi
scontrol update NodeName="$NODE" State=RESUME > /dev/null 2>&1  # a node left DOWN by an earlier stop
wait_for 60 "node $NODE idle" cluster_answers || fail "sinfo shows no idle node (see $LOG/slurmd.log, $LOG/slurmctld.log)"
say "started in $(elapsed) s; pids in $RUN/pids:"
sed 's/^/  /' "$RUN/pids"
sinfo
