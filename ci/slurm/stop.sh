#!/usr/bin/env bash
# Stop the daemons ci/slurm/start.sh started (slurmd, slurmctld, slurmdbd, MariaDB, munged), by the pids it
# recorded in /run/ddpm-slurm/pids, newest first; nothing else is touched. Packages and job records stay.
set -uo pipefail
RUN=/run/ddpm-slurm
[ -s "$RUN/pids" ] || { echo "slurm: no daemons recorded in $RUN/pids"; exit 0; }
tac "$RUN/pids" | while read -r name pid; do
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        echo "slurm: stopped $name (pid $pid)"
    fi
    rm -f "$RUN/$name.pid"
done
rm -f "$RUN/pids"
