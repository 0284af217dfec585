#!/usr/bin/env bash
# Brings up a one-node Slurm on this machine for the tests (tests/engine/slurm.rs): Debian's
# slurmctld, slurmd and munge (installed with apt-get when missing; needs root), a minimal
# slurm.conf (one node named after this host at 127.0.0.1, proctrack/linuxproc, task/none,
# cons_tres by CPU, no accounting database), the daemons started without systemd.
# Idempotent: when the node already answers, it only says so. Prints the node's line of sinfo.
#
#   scripts/slurm/up.sh          # start (install first if needed)
#   scripts/slurm/up.sh --down   # stop the daemons (the configuration stays)
set -euo pipefail

conf_dir=/etc/slurm
spool=/var/spool/cusa-slurm
logs=/var/log/cusa-slurm
node=$(hostname -s)

if [ "${1:-}" = "--down" ]; then
  pkill -x slurmd || true
  pkill -x slurmctld || true
  pkill -x munged || true
  # Wait for them to be gone, so an `up` right after starts fresh daemons.
  for _ in $(seq 1 50); do
    if ! pgrep -x slurmd >/dev/null && ! pgrep -x slurmctld >/dev/null \
      && ! pgrep -x munged >/dev/null; then
      exit 0
    fi
    sleep 0.2
  done
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "scripts/slurm/up.sh: run as root (it installs packages and starts daemons)" >&2
  exit 2
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
  || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null \
  || ! command -v pgrep >/dev/null; then
  echo "installing slurmctld, slurmd, slurm-client and munge from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurmctld slurmd slurm-client munge procps >/dev/null
fi

mkdir -p "$conf_dir" "$spool/ctld" "$spool/d" "$logs" /run/munge
cat > "$conf_dir/slurm.conf.new" <<CONF
# Written by cusa-pipe's scripts/slurm/up.sh: a one-node test cluster.
ClusterName=cusa-test
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
StateSaveLocation=$spool/ctld
SlurmdSpoolDir=$spool/d
SlurmctldPidFile=/run/cusa-slurmctld.pid
SlurmdPidFile=/run/cusa-slurmd.pid
SlurmctldLogFile=$logs/slurmctld.log
SlurmdLogFile=$logs/slurmd.log
ReturnToService=2
# Finished jobs stay visible to squeue for 5 minutes (there is no accounting database).
MinJobAge=300
KillWait=10
SlurmdParameters=config_overrides
NodeName=$node NodeAddr=127.0.0.1 CPUs=8 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
mv "$conf_dir/slurm.conf.new" "$conf_dir/slurm.conf"

if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key
fi
chown -R munge:munge /etc/munge /run/munge
chmod 700 /etc/munge
chmod 600 /etc/munge/munge.key
mkdir -p /var/lib/munge /var/log/munge
chown munge:munge /var/lib/munge /var/log/munge

if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged
fi
if ! pgrep -x slurmctld >/dev/null; then
  slurmctld
fi
if ! pgrep -x slurmd >/dev/null; then
  slurmd -N "$node"
fi

# Wait for the node to be usable (the controller needs a few seconds to register it).
for _ in $(seq 1 60); do
  state=$(sinfo --noheader --nodes="$node" --format=%t 2>/dev/null || true)
  case "$state" in
    idle*|mix*|alloc*) sinfo --nodes="$node"; exit 0 ;;
    down*|drain*) scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done
echo "scripts/slurm/up.sh: the node did not come up; last lines of the logs:" >&2
tail -n 20 "$logs/slurmctld.log" "$logs/slurmd.log" >&2 || true
exit 1
