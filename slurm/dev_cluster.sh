#!/usr/bin/env bash
# A Slurm cluster on this machine, for the tests and for trying `launch=slurm` locally.
#
#   bash slurm/dev_cluster.sh [start]   install slurm-wlm + munge if missing (apt, needs root), write a
#                                       one-node slurm.conf, start munged/slurmctld/slurmd, wait until
#                                       the node is idle. Does nothing if `sinfo` already answers.
#   bash slurm/dev_cluster.sh stop      stop only the daemons this script started (by their pid files).
#
#   bash slurm/dev_cluster.sh start nodes=2
#       a second, separate cluster of two nodes, each a network namespace (gd-node1, gd-node2) with its
#       own hostname, its own address on a private bridge (gd-br0, 198.18.0.0/24: a range reserved for
#       network tests) and its own slurmd; its slurmctld runs on this host at 198.18.0.1. Its config is
#       /var/lib/gorilla-slurm-2node/slurm.conf, so it runs beside the one-node cluster: point Slurm's
#       commands at it with `export SLURM_CONF=/var/lib/gorilla-slurm-2node/slurm.conf`. Needs root.
#   bash slurm/dev_cluster.sh stop nodes=2
#       stops its daemons (pid files), every process left in its namespaces, and removes the namespaces
#       and the bridge: exactly what start created, nothing else.
#   bash slurm/dev_cluster.sh on gd-node2 CMD...
#       runs CMD as if on that node (its network namespace, hostname and /etc/hosts), e.g. one torchrun
#       per node, or `ip link set eth0 down` to unplug it.
#
# It never overwrites a slurm.conf it did not write: on a machine with a real Slurm it only checks it.
set -euo pipefail

NODES=1
ACTION=start
for arg in "$@"; do
    [ "${1:-}" = on ] && break
    case "$arg" in
        start|stop) ACTION=$arg ;;
        nodes=1|nodes=2) NODES=${arg#nodes=} ;;
        *) echo "usage: bash slurm/dev_cluster.sh [start|stop] [nodes=1|nodes=2] (got '$arg')" >&2; exit 2 ;;
    esac
done

STATE=${GORILLA_SLURM_STATE:-/var/lib/gorilla-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by gorilla_dist slurm/dev_cluster.sh"
# the two-node cluster
STATE2=${GORILLA_SLURM2_STATE:-/var/lib/gorilla-slurm-2node}
CONF2=$STATE2/slurm.conf
BRIDGE=gd-br0
NET=198.18.0          # RFC 2544's benchmarking range: nothing outside this script's bridge uses it
CTLD_PORT2=6827       # beside the one-node cluster's 6817
NS_NODES="gd-node1 gd-node2"

log() { echo "[dev_cluster] $*"; }

stop_pidfile() {  # stop_pidfile NAME FILE: TERM, then KILL a daemon stuck on a dead peer
    local name=$1 pidfile=$2 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        log "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
}

stop_munged() {  # stop_munged MY_STATE OTHER_STATE: munged serves both clusters; the other may still run
    if [ -f "$1/munged.pid" ] && alive "$2/slurmctld.pid"; then
        mv "$1/munged.pid" "$2/munged.pid"  # the other cluster's stop ends it
    else
        stop_pidfile munged "$1/munged.pid"
    fi
}

stop() {
    for d in slurmd slurmctld; do stop_pidfile "$d" "$STATE/$d.pid"; done
    stop_munged "$STATE" "$STATE2"
}

running() { timeout 5 sinfo -h >/dev/null 2>&1; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }  # alive PIDFILE

up_nodes() { sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)' || true; }

install_if_missing() {
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
}

start_munged() {  # start_munged STATE_DIR: one munged serves both clusters; the one that starts it records it
    mkdir -p /run/munge
    chown munge:munge /run/munge
    if ! pgrep -x munged >/dev/null; then
        [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; }
        runuser -u munge -- munged --force
        for _ in $(seq 20); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
        cp /run/munge/munged.pid "$1/munged.pid"
        log "started munged (pid $(cat "$1/munged.pid"))"
    fi
}

common_conf() {  # common_conf STATE_DIR CLUSTER_NAME: what both clusters' slurm.conf share
    cat <<EOF
$MARK
ClusterName=$2
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$1/ctld
SlurmctldPidFile=$1/slurmctld.pid
SlurmctldLogFile=$1/log/slurmctld.log
MpiDefault=none
EOF
}

wait_up() {  # wait_up N LOGDIR: until N nodes are idle (or busy)
    for _ in $(seq 60); do
        if running && [ "$(up_nodes)" -ge "$1" ]; then
            log "up: $(sinfo -h -o '%P %D %T %C %N')"
            return 0
        fi
        sleep 0.5
    done
    echo "[dev_cluster] error: the nodes did not come up within 30 s; see $2" >&2
    exit 1
}

start() {
    if command -v sinfo >/dev/null && [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF" && running; then
        log "a Slurm cluster already answers (config $CONF, not ours): using it"
        return 0
    fi
    install_if_missing
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        echo "[dev_cluster] error: $CONF exists but no Slurm controller answers; it is not ours, so it is" \
             "left alone. Start that cluster's daemons, or move the file away to get a one-node test cluster." >&2
        exit 1
    fi
    mkdir -p "$STATE/ctld" "$STATE/d" "$STATE/log" /etc/slurm
    # The node line as slurmd measures this machine (CPUs, sockets, cores, memory).
    { common_conf "$STATE" gorilla-dev
      cat <<EOF
SlurmctldHost=$(hostname -s)
SlurmdSpoolDir=$STATE/d
SlurmdPidFile=$STATE/slurmd.pid
SlurmdLogFile=$STATE/log/slurmd.log
$(slurmd -C | head -n1) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    } > "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    start_munged "$STATE"
    # (by pid file: the two-node cluster's daemons have the same names)
    alive "$STATE/slurmctld.pid" || { slurmctld; log "started slurmctld"; }
    alive "$STATE/slurmd.pid" || { slurmd; log "started slurmd"; }
    wait_up 1 "$STATE/log/"
}

# --- two nodes in network namespaces -------------------------------------------------------------

node_addr() { echo "$NET.$((${1#gd-node} + 1))"; }  # gd-node1 -> 198.18.0.2

# on_node NODE CMD...: run CMD as if on that node: its network namespace, its hostname (a UTS namespace)
# and /etc/hosts naming the cluster's hosts (a private mount namespace; `ip netns exec` would also remount
# /sys, hiding the cgroup hierarchy slurmd needs).
on_node() {
    local n=$1; shift
    nsenter --net="/run/netns/$n" unshare --mount --uts \
        sh -c 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"' "$STATE2/hosts" "$n" "$@"
}

start2() {
    export SLURM_CONF=$CONF2
    if [ -f "$CONF2" ] && running && [ "$(up_nodes)" -ge 2 ]; then
        log "the two-node cluster already answers: $(sinfo -h -o '%P %D %T %N')"
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "[dev_cluster] error: nodes=2 creates network namespaces and a bridge: run it as root" >&2
        exit 1
    fi
    install_if_missing
    if [ -f "$CONF2" ] && ! grep -qF "$MARK" "$CONF2"; then
        echo "[dev_cluster] error: $CONF2 exists and was not written by this script; left alone" >&2
        exit 1
    fi
    if ip link show "$BRIDGE" >/dev/null 2>&1 && [ ! -f "$STATE2/bridge" ]; then
        echo "[dev_cluster] error: a network interface named $BRIDGE exists and this script did not create" \
             "it; left alone" >&2
        exit 1
    fi
    mkdir -p "$STATE2/ctld" "$STATE2/log"
    if [ ! -f "$STATE2/bridge" ]; then
        ip link add "$BRIDGE" type bridge
        touch "$STATE2/bridge"
        ip addr add "$NET.1/24" dev "$BRIDGE"
        ip link set "$BRIDGE" up
    fi
    # (the IPv4-mapped lines answer the reverse lookups of torch's store, which listens on IPv6)
    { echo "127.0.0.1 localhost"; echo "$NET.1 gd-head"
      for n in $NS_NODES; do echo "$(node_addr "$n") $n"; echo "::ffff:$(node_addr "$n") $n"; done
    } > "$STATE2/hosts"
    for n in $NS_NODES; do
        if ! ip netns list | grep -qw "$n"; then
            ip netns add "$n"
            ip link add "gd-v${n#gd-node}" type veth peer name eth0 netns "$n"
            ip link set "gd-v${n#gd-node}" master "$BRIDGE" up
            ip netns exec "$n" ip addr add "$(node_addr "$n")/24" dev eth0
            ip netns exec "$n" ip link set eth0 up
            ip netns exec "$n" ip link set lo up
            log "created namespace $n ($(node_addr "$n"))"
        fi
    done
    node=$(slurmd -C | head -n1 | sed 's/^NodeName=[^ ]* //')
    { common_conf "$STATE2" gorilla-dev2
      # slurmctld must carry this host's name; the nodes reach it at the bridge's address
      cat <<EOF
SlurmctldHost=$(hostname -s)($NET.1)
SlurmctldPort=$CTLD_PORT2
SlurmdSpoolDir=$STATE2/d.%n
SlurmdPidFile=$STATE2/slurmd.%n.pid
SlurmdLogFile=$STATE2/log/slurmd.%n.log
EOF
      for n in $NS_NODES; do echo "NodeName=$n NodeAddr=$(node_addr "$n") NodeHostname=$n $node State=UNKNOWN"; done
      echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } > "$CONF2.tmp"
    mv "$CONF2.tmp" "$CONF2"
    start_munged "$STATE2"
    # -c: a fresh controller forgets the jobs of an earlier start (their nodes were torn down with it)
    alive "$STATE2/slurmctld.pid" || { slurmctld -c -f "$CONF2"; log "started slurmctld ($CONF2)"; }
    for n in $NS_NODES; do
        alive "$STATE2/slurmd.$n.pid" && continue
        mkdir -p "$STATE2/d.$n"
        on_node "$n" slurmd -f "$CONF2" -N "$n"
        log "started slurmd on $n"
    done
    wait_up 2 "$STATE2/log/"
    log "use it with: export SLURM_CONF=$CONF2"
}

stop2() {
    for n in $NS_NODES; do stop_pidfile "slurmd on $n" "$STATE2/slurmd.$n.pid"; done
    stop_pidfile slurmctld "$STATE2/slurmctld.pid"
    stop_munged "$STATE2" "$STATE"
    for n in $NS_NODES; do
        if ip netns list | grep -qw "$n"; then
            pids=$(ip netns pids "$n" 2>/dev/null || true)  # jobs' processes left on the node
            if [ -n "$pids" ]; then kill -9 $pids 2>/dev/null || true; fi
            ip netns del "$n"
            log "removed namespace $n"
        fi
        # the host's end of its link (a kernel drops it with the namespace; some sandboxes do not)
        ip link del "gd-v${n#gd-node}" 2>/dev/null || true
    done
    if [ -f "$STATE2/bridge" ]; then
        ip link del "$BRIDGE" 2>/dev/null || true
        rm -f "$STATE2/bridge"
        log "removed bridge $BRIDGE"
    fi
}

if [ "${1:-}" = on ]; then  # bash slurm/dev_cluster.sh on gd-node1 CMD...
    [ $# -ge 3 ] && [[ " $NS_NODES " == *" $2 "* ]] || {
        echo "usage: bash slurm/dev_cluster.sh on <$(echo $NS_NODES | tr ' ' '|')> CMD..." >&2; exit 2; }
    shift
    on_node "$@"
    exit $?
fi

case "$ACTION-$NODES" in
    start-1) start ;;
    stop-1) stop ;;
    start-2) start2 ;;
    stop-2) stop2 ;;
esac
