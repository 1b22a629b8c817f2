#!/usr/bin/env bash
# A throw-away one-node SLURM cluster on this machine, for tests/test_slurm.py.
#
#   sudo bash tests/slurm/cluster.sh start    # install (if missing), configure, start, wait idle
#   bash tests/slurm/cluster.sh status        # exit 0 iff the node answers and is usable
#   bash tests/slurm/cluster.sh env           # prints `export SLURM_CONF=...` for eval
#   sudo bash tests/slurm/cluster.sh stop     # cancel jobs, stop daemons, remove all state
#
# Everything the cluster writes (config, munge key and socket, spool, logs, pid files) lives in
# one state directory, $LEUKOTYPE_SLURM_STATE (default /tmp/leukotype-slurm). The one thing
# outside it is the symlink /etc/slurm/slurm.conf -> $STATE/etc/slurm.conf: snakemake's jobstep
# plugin strips SLURM_CONF from the environment of the `srun` it runs inside each job, so
# clients there only find the cluster at the compiled-in default path. `start` refuses to
# touch an existing /etc/slurm/slurm.conf that is not its own symlink; `stop` removes it.
# Design choices, and why:
# - accounting_storage/none (no slurmdbd/MariaDB: too heavy for CI). Without a database `sacct`
#   cannot answer, so the test runs snakemake with `--slurm-status-command squeue`; squeue sees
#   finished jobs for MinJobAge seconds, set here to 3600 s (the plugin falls back to sacct if
#   MinJobAge < 3 x its first status-check delay). The tests read every job's record with
#   scontrol after the whole run: at 600 s, on 2 loaded cores, the real case's first jobs were
#   purged before that ("scontrol show job" exit 1).
# - jobcomp/filetxt keeps a one-line record per finished job in $STATE/jobcomp.log, a second
#   witness (besides scontrol) that jobs really ran through slurmctld.
# - select/cons_tres with CR_CPU_Memory: CPUs and memory are consumable, so mem_mb/--mem and
#   threads/--cpus-per-task are enforced by the scheduler as on a real cluster. No GRES/GPUs.
# - proctrack/linuxproc + task/none: no cgroup setup needed inside containers.
# - The one partition, "debug", is not a default: jobs must name it (sbatch -p), so the test
#   proves that the profile's slurm_partition reaches sbatch.
# - Non-default ports (16817/16818) so that a real SLURM installation is never disturbed.
# The script is idempotent (start on a running cluster is a no-op; stop on a stopped one too)
# and fails loudly: any problem exits non-zero with a message on stderr.
set -euo pipefail

STATE="${LEUKOTYPE_SLURM_STATE:-/tmp/leukotype-slurm}"
CONF="$STATE/etc/slurm.conf"
ETC_CONF=/etc/slurm/slurm.conf
PACKAGES=(munge slurm-client slurmctld slurmd)
CTLD_PORT="${LEUKOTYPE_SLURM_CTLD_PORT:-16817}"
SLURMD_PORT="${LEUKOTYPE_SLURM_SLURMD_PORT:-16818}"
START_TIMEOUT_S="${LEUKOTYPE_SLURM_START_TIMEOUT_S:-60}"
PARTITION="debug"

die() { echo "cluster.sh: ERROR: $*" >&2; exit 1; }
say() { echo "cluster.sh: $*" >&2; }

require_root() {
    [[ "$(id -u)" -eq 0 ]] || die "'$1' needs root (packages are installed and the daemons run as root); run: sudo bash $0 $1"
}

missing_packages() {
    local pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
    done
}

install_packages() {
    local missing
    missing="$(missing_packages | tr '\n' ' ')"
    [[ -z "${missing// }" ]] && return 0
    command -v apt-get >/dev/null || die "packages missing ($missing) and apt-get not found; install SLURM (slurmctld, slurmd, slurm-client, munge) by hand"
    say "installing $missing (apt-get)"
    local t0=$SECONDS
    # Keep the packages' maintainer scripts from starting system-wide munge/slurm daemons: we
    # start our own from $STATE. policy-rc.d is only created (and removed) if it did not exist.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created_policy=1
    fi
    local rc=0
    {
        apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
    } >"/tmp/leukotype-slurm-apt.log" 2>&1 || rc=$?
    [[ "$created_policy" -eq 1 ]] && rm -f "$policy"
    [[ "$rc" -eq 0 ]] || { tail -n 20 /tmp/leukotype-slurm-apt.log >&2; die "apt-get install failed (rc=$rc), full log: /tmp/leukotype-slurm-apt.log"; }
    missing="$(missing_packages | tr '\n' ' ')"
    [[ -z "${missing// }" ]] || die "still missing after apt-get: $missing"
    say "installed in $((SECONDS - t0)) s"
}

# pid of a daemon we started, or nothing if it is not running (checks the pid still belongs to
# that program, so a recycled pid is never reported or killed).
daemon_pid() {
    local name="$1" pidfile="$STATE/run/$1.pid" pid
    [[ -s "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    if [[ -r "/proc/$pid/comm" ]] && [[ "$(cat "/proc/$pid/comm")" == "$name" ]]; then
        echo "$pid"
    fi
}

node_state() {
    SLURM_CONF="$CONF" timeout 10 sinfo --noheader --Node --format=%T 2>/dev/null | head -n 1 | tr -d '*~#!%$@^-' || true
}

is_up() {
    [[ -f "$CONF" ]] && [[ "$(readlink "$ETC_CONF" 2>/dev/null)" == "$CONF" ]] && [[ -n "$(daemon_pid munged)" ]] && [[ -n "$(daemon_pid slurmctld)" ]] &&
        [[ -n "$(daemon_pid slurmd)" ]] && [[ "$(node_state)" =~ ^(idle|mixed|allocated)$ ]]
}

write_config() {
    local host cpus mem_mb
    host="$(hostname -s)"
    cpus="$(nproc)"
    # Declare ~90 % of the memory: a node whose RealMemory exceeds what slurmd measures is
    # drained ("Low RealMemory").
    mem_mb="$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
    mkdir -p "$STATE"/{etc,run,log,ctld,spool,munge,munge-key}
    # Readable for everyone: a non-root user's sbatch/squeue needs the config and the munge
    # socket. Private: slurmctld's state and the munge key.
    chmod 755 "$STATE" "$STATE"/{etc,run,log,spool,munge}
    chmod 700 "$STATE/ctld" "$STATE/munge-key"
    cat >"$CONF" <<EOF
# Generated by tests/slurm/cluster.sh for the leukotype SLURM test; removed by 'stop'.
ClusterName=leukotype-test
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${STATE}/munge/munge.socket
StateSaveLocation=${STATE}/ctld
SlurmdSpoolDir=${STATE}/spool/slurmd-%n
SlurmctldPidFile=${STATE}/run/slurmctld.pid
SlurmdPidFile=${STATE}/run/slurmd.pid
SlurmctldLogFile=${STATE}/log/slurmctld.log
SlurmdLogFile=${STATE}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${STATE}/jobcomp.log
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
MinJobAge=3600
DefMemPerCPU=1000
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
# Not a default partition: a job only runs if its sbatch names it (-p), as the profile must.
PartitionName=${PARTITION} Nodes=ALL Default=NO MaxTime=INFINITE State=UP
EOF
}

link_etc_conf() {
    if [[ -L "$ETC_CONF" && "$(readlink "$ETC_CONF")" == "$CONF" ]]; then
        return 0
    fi
    [[ -e "$ETC_CONF" || -L "$ETC_CONF" ]] && die "$ETC_CONF exists (a real SLURM set-up?); this throw-away cluster will not replace it. Stop that SLURM or run the test elsewhere."
    mkdir -p "$(dirname "$ETC_CONF")"
    ln -s "$CONF" "$ETC_CONF"
}

unlink_etc_conf() {
    if [[ -L "$ETC_CONF" && "$(readlink "$ETC_CONF")" == "$CONF" ]]; then
        rm -f "$ETC_CONF"
    fi
}

start_munge() {
    local key="$STATE/munge-key/munge.key"
    [[ -s "$key" ]] || { dd if=/dev/urandom of="$key" bs=1024 count=1 status=none; chmod 400 "$key"; }
    # --force: munged refuses group/world-writable parents such as /tmp (sticky bit) otherwise.
    /usr/sbin/munged --force --socket="$STATE/munge/munge.socket" --key-file="$key" \
        --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge-key/munged.seed" \
        || fail_start "munged failed to start"
}

wait_for() {  # wait_for DESCRIPTION COMMAND...: poll for up to START_TIMEOUT_S seconds
    local what="$1"; shift
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until "$@"; do
        (( SECONDS < deadline )) || return 1
        sleep 0.5
    done
}

node_idle() { [[ "$(node_state)" == "idle" ]]; }

dump_logs() {
    local f
    for f in "$STATE"/log/*.log; do
        [[ -f "$f" ]] || continue
        echo "----- $f (last 15 lines) -----" >&2
        tail -n 15 "$f" >&2
    done
}

fail_start() {  # show the daemons' logs, remove the half-started cluster, then fail loudly
    dump_logs
    cmd_stop || true
    die "$1"
}

cmd_start() {
    require_root start
    install_packages
    if is_up; then
        say "already running (SLURM_CONF=$CONF)"
        return 0
    fi
    # A half-started or stale cluster: clean it away first so start is idempotent.
    [[ -e "$STATE" ]] && cmd_stop
    local t0=$SECONDS
    write_config
    link_etc_conf
    start_munge
    export SLURM_CONF="$CONF"
    # -i: ignore state left by a previous run (there is none; the state dir is fresh).
    /usr/sbin/slurmctld -i || fail_start "slurmctld failed to start"
    wait_for slurmctld bash -c "SLURM_CONF='$CONF' scontrol ping >/dev/null 2>&1" \
        || fail_start "slurmctld did not answer 'scontrol ping' within ${START_TIMEOUT_S}s"
    /usr/sbin/slurmd || fail_start "slurmd failed to start"
    wait_for "node idle" node_idle \
        || fail_start "node not idle within ${START_TIMEOUT_S}s (state: '$(node_state)')"
    say "up in $((SECONDS - t0)) s: partition '$PARTITION', $(nproc) CPUs; export SLURM_CONF=$CONF"
}

stop_daemon() {  # SIGTERM, then SIGKILL after 10 s, only the pid from our own pid file
    local name="$1" pid i
    pid="$(daemon_pid "$name")"
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 20); do
        [[ -d "/proc/$pid" ]] || return 0
        sleep 0.5
    done
    say "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

cmd_stop() {
    if [[ ! -e "$STATE" ]]; then
        [[ -L "$ETC_CONF" ]] && { require_root stop; unlink_etc_conf; }
        say "not running (no $STATE)"
        return 0
    fi
    require_root stop
    if [[ -n "$(daemon_pid slurmctld)" ]]; then
        # Cancel leftover jobs so that no slurmstepd (which outlives slurmd) keeps running.
        local jobs
        jobs="$(SLURM_CONF="$CONF" timeout 10 squeue --noheader --format=%i 2>/dev/null | tr '\n' ' ' || true)"
        if [[ -n "${jobs// }" ]]; then
            say "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            SLURM_CONF="$CONF" scancel $jobs || true
            wait_for "jobs gone" bash -c "[[ -z \"\$(SLURM_CONF='$CONF' squeue --noheader --states=PENDING,RUNNING,COMPLETING 2>/dev/null)\" ]]" || say "jobs still listed after ${START_TIMEOUT_S}s"
        fi
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
    local left=""
    for name in slurmd slurmctld munged; do
        [[ -n "$(daemon_pid "$name")" ]] && left+=" $name"
    done
    [[ -z "$left" ]] || die "could not stop:$left (state kept in $STATE)"
    unlink_etc_conf
    rm -rf "$STATE"
    say "stopped; removed $STATE"
}

cmd_status() {
    if is_up; then
        echo "up: node $(node_state), SLURM_CONF=$CONF"
        return 0
    fi
    echo "down (state dir: $STATE; munged=$(daemon_pid munged) slurmctld=$(daemon_pid slurmctld) slurmd=$(daemon_pid slurmd) node='$(node_state)')" >&2
    return 1
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) die "usage: $0 start|stop|status|env" ;;
esac
