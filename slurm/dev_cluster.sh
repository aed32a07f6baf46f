#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests and for trying `launch=slurm` locally.
#
#   bash slurm/dev_cluster.sh [start]   install slurm-wlm + munge if missing (apt, needs root), write a
#                                       one-node slurm.conf, start munged/slurmctld/slurmd, wait until
#                                       the node is idle. Does nothing if `sinfo` already answers.
#   bash slurm/dev_cluster.sh stop      stop only the daemons this script started (by their pid files).
#
# It never overwrites a slurm.conf it did not write: on a machine with a real Slurm it only checks it.
set -euo pipefail

STATE=${GORILLA_SLURM_STATE:-/var/lib/gorilla-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by gorilla_dist slurm/dev_cluster.sh"

log() { echo "[dev_cluster] $*"; }

stop() {
    for d in slurmd slurmctld munged; do
        pidfile="$STATE/$d.pid"
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"  # a daemon stuck on a dead peer ignores TERM
            log "stopped $d (pid $pid)"
        fi
        rm -f "$pidfile"
    done
}

running() { timeout 5 sinfo -h >/dev/null 2>&1; }

start() {
    if command -v sinfo >/dev/null && [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF" && running; then
        log "a Slurm cluster already answers (config $CONF, not ours): using it"
        return 0
    fi
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        if [ "$(id -u)" != 0 ]; then
            echo "[dev_cluster] error: slurm-wlm and munge are not installed and this is not root;" \
                 "install them with: sudo apt-get install -y slurm-wlm munge" >&2
            exit 1
        fi
        log "installing slurm-wlm and munge (apt)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq slurm-wlm munge >/dev/null
    fi
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        echo "[dev_cluster] error: $CONF exists but no Slurm controller answers; it is not ours, so it is" \
             "left alone. Start that cluster's daemons, or move the file away to get a one-node test cluster." >&2
        exit 1
    fi
    mkdir -p "$STATE/ctld" "$STATE/d" "$STATE/log" /etc/slurm /run/munge
    host=$(hostname -s)
    # The node line as slurmd measures this machine (CPUs, sockets, cores, memory).
    node=$(slurmd -C | head -n1)
    cat > "$CONF.tmp" <<EOF
$MARK
ClusterName=gorilla-dev
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
MpiDefault=none
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    chown munge:munge /run/munge
    if ! pgrep -x munged >/dev/null; then
        [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; }
        runuser -u munge -- munged --force
        for _ in $(seq 20); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
        cp /run/munge/munged.pid "$STATE/munged.pid"
        log "started munged (pid $(cat "$STATE/munged.pid"))"
    fi
    pgrep -x slurmctld >/dev/null || { slurmctld; log "started slurmctld"; }
    pgrep -x slurmd >/dev/null || { slurmd; log "started slurmd"; }
    for _ in $(seq 60); do
        if running && sinfo -h -o %T | grep -qE '^(idle|mixed|allocated)'; then
            log "node $host is up: $(sinfo -h -o '%P %D %T %C')"
            return 0
        fi
        sleep 0.5
    done
    echo "[dev_cluster] error: the node did not come up within 30 s; see $STATE/log/" >&2
    exit 1
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: bash slurm/dev_cluster.sh [start|stop]" >&2; exit 2 ;;
esac
