"""A real Slurm cluster on this machine, for the tests: munged, slurmctld and two slurmd.

Each slurmd runs in a network namespace of its own (``lpn1``, ``lpn2``), joined to the host by a
veth pair on a bridge (``lpbr0``, 10.77.0.0/24), so the two nodes have addresses of their own and a
``--nodes 2`` job runs one task on each, talking gloo over those links; nothing leaves the machine.
Debian's Slurm is not built with ``--enable-multiple-slurmd``, so two slurmd on one network stack
cannot share it. Where namespaces cannot be made (no CAP_NET_ADMIN) the cluster is one node on
loopback and ``nodes`` says so.

Everything lives in a fresh folder under /tmp (short: munge's socket path has a length limit), and
``stop`` kills every daemon started here and removes the links and the ``/etc/hosts`` lines it added.
Run by hand: ``python tests/slurm/cluster.py`` starts one and waits for Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

PACKAGES = ("slurm-wlm", "munge")
BRIDGE, SUBNET = "lpbr0", "10.77.0"
HOSTS_MARK = "# lit-peft test cluster"


class ClusterUnavailable(RuntimeError):
    """Why no cluster could be started here (the tests skip with this reason)."""


def run(*cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=timeout, **kw)


def ensure_installed() -> None:
    if os.geteuid() != 0:
        raise ClusterUnavailable("starting a Slurm cluster needs root (daemons, network namespaces, /etc/hosts)")
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if not shutil.which("apt-get"):
        raise ClusterUnavailable("slurm-wlm and munge are not installed and there is no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        run("apt-get", "update", "-qq", timeout=600, env=env)
        run("apt-get", "install", "-y", "-qq", *PACKAGES, timeout=900, env=env)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        out = getattr(err, "stderr", "") or ""
        raise ClusterUnavailable(f"could not install {' '.join(PACKAGES)} with apt-get: {out.strip()[-300:]}") from err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, nodes: int = 2, cpus: int = 2) -> None:
        self.want_nodes, self.cpus = nodes, cpus
        self.dir = Path(tempfile.mkdtemp(prefix="lps-", dir="/tmp"))
        self.procs: list[subprocess.Popen] = []
        self.namespaces: list[str] = []
        self.node_names: list[str] = []
        self.env: dict[str, str] = {}

    # ---- start --------------------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        ensure_installed()
        self._remove_network()  # what a cluster killed before its stop left behind
        try:
            self._network()
        except (subprocess.CalledProcessError, OSError) as err:
            self._remove_network()
            self.note = f"network namespaces unavailable ({getattr(err, 'stderr', err)!s:.200}): one node on loopback"
            self.node_names, self.addresses = ["lpnode1"], ["127.0.0.1"]
            self.controller_address = "127.0.0.1"
        else:
            self.note = f"{len(self.node_names)} nodes, each slurmd in its own network namespace"
        self._hosts()
        self._munge()
        self._config()
        self._daemons()
        self._wait_idle()
        return self

    def _network(self) -> None:
        self.controller_address = f"{SUBNET}.1"
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{self.controller_address}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        self.addresses = []
        for i in range(1, self.want_nodes + 1):
            ns, host_end, ns_end, addr = f"lpn{i}", f"lpv{i}", f"lpp{i}", f"{SUBNET}.{10 + i}"
            run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            run("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            run("ip", "link", "set", ns_end, "netns", ns)
            run("ip", "link", "set", host_end, "master", BRIDGE)
            run("ip", "link", "set", host_end, "up")
            run("ip", "-n", ns, "link", "set", ns_end, "name", "lp0")
            run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "lp0")
            run("ip", "-n", ns, "link", "set", "lp0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            self.addresses.append(addr)
            self.node_names.append(f"lpnode{i}")
        # each node reaches the other through the bridge
        run("ip", "netns", "exec", "lpn1", "ping", "-c1", "-W2", self.addresses[-1], check=False)
        # gloo binds to the interface that carries the node's address (the same name in every namespace)
        self.env["GLOO_SOCKET_IFNAME"] = "lp0"

    def _hosts(self) -> None:
        lines = [f"{a} {n} {HOSTS_MARK}" for a, n in zip(self.addresses, self.node_names)]
        self._remove_hosts()
        with open("/etc/hosts", "a") as f:
            f.write("\n".join(lines) + "\n")

    def _munge(self) -> None:
        key = self.dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = self.dir / "munge.sock"
        self._spawn("munged", "--foreground", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                    f"--pid-file={self.dir / 'munged.pid'}", f"--log-file={self.dir / 'munged.log'}",
                    f"--seed-file={self.dir / 'munged.seed'}", log="munged.out")
        for _ in range(100):
            if self.munge_socket.exists():
                return
            time.sleep(0.1)
        raise RuntimeError(f"munged did not start: {(self.dir / 'munged.out').read_text()[-300:]}")

    def _config(self) -> None:
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir()
        nodes = "\n".join(f"NodeName={n} NodeAddr={a} CPUs={self.cpus} State=UNKNOWN"
                          for n, a in zip(self.node_names, self.addresses))
        # cred_expire: how long a job credential lives, and so how long a requeued job waits before
        # it may start again (120 s by default; starting it sooner fails: "Job credential revoked")
        self.conf = d / "slurm.conf"
        self.conf.write_text(f"""\
ClusterName=litpeft
SlurmctldHost={socket.gethostname()}({self.controller_address})
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MpiDefault=none
MailProg=/bin/true
KillWait=10
MinJobAge=600
InactiveLimit=0
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        # slurmd initialises a cgroup plugin whatever the proctrack and task plugins; autodetection
        # fails where /sys/fs/cgroup is a tmpfs of v1 hierarchies (a container), so name it
        version = "v2" if run("stat", "-fc", "%T", "/sys/fs/cgroup", check=False).stdout.strip() == "cgroup2fs" else "v1"
        (d / "cgroup.conf").write_text(f"CgroupPlugin=cgroup/{version}\nCgroupMountpoint=/sys/fs/cgroup\n")
        self.env["SLURM_CONF"] = str(self.conf)

    def _spawn(self, *cmd: str, log: str, netns: Optional[str] = None) -> None:
        argv = (["ip", "netns", "exec", netns] if netns else []) + list(cmd)
        out = open(self.dir / log, "w")
        env = {**os.environ, **self.env}
        self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True))

    def _daemons(self) -> None:
        self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf), log="slurmctld.out")
        time.sleep(1)
        for i, name in enumerate(self.node_names):
            (self.dir / "spool" / name).mkdir()
            ns = self.namespaces[i] if self.namespaces else None
            self._spawn("slurmd", "-D", "-N", name, "-f", str(self.conf), log=f"slurmd-{name}.out", netns=ns)

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.sh("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            if len(states) == len(self.node_names) and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.5)
        logs = "; ".join(f"{p.name}: {p.read_text()[-300:]}" for p in sorted(self.dir.glob("*.log")))
        raise RuntimeError(f"Slurm nodes did not become idle within {timeout:.0f} s ({states}); {logs}")

    # ---- use ----------------------------------------------------------------------------------
    @property
    def nodes(self) -> int:
        return len(self.node_names)

    def sh(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        return run(*cmd, check=check, timeout=timeout, env={**os.environ, **self.env})

    def daemon_logs(self, chars: int = 1500) -> str:
        """The ends of slurmctld's and each slurmd's logs (for a failed job's message)."""
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in sorted(self.dir.glob("*.log")))

    def idle(self) -> bool:
        """Whether every node is idle (no job, none still completing)."""
        states = self.sh("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
        return len(states) == self.nodes and all(s == "idle" for s in states)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.sh("scontrol", "-o", "show", "job", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
             timeout: float = 600) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f} s")

    # ---- stop ---------------------------------------------------------------------------------
    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        # job steps the daemons started (slurmstepd and its tasks) that outlived them
        run("pkill", "-f", f"slurmstepd.*{self.dir}", check=False)
        self.procs = []
        self._remove_network()
        self._remove_hosts()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _remove_network(self) -> None:
        for ns in self.namespaces or [f"lpn{i}" for i in range(1, self.want_nodes + 1)]:
            for pid in run("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            run("ip", "netns", "del", ns, check=False)
        for i in range(1, self.want_nodes + 1):
            run("ip", "link", "del", f"lpv{i}", check=False)
        run("ip", "link", "del", BRIDGE, check=False)
        self.namespaces = []

    @staticmethod
    def _remove_hosts() -> None:
        try:
            lines = Path("/etc/hosts").read_text().splitlines(keepends=True)
        except OSError:
            return
        kept = [line for line in lines if HOSTS_MARK not in line]
        if kept != lines:
            # write in place: in a container /etc/hosts is a bind mount that cannot be replaced
            with open("/etc/hosts", "w") as f:
                f.writelines(kept)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    cluster = SlurmCluster().start()
    print(f"cluster up: {cluster.note}; export SLURM_CONF={cluster.conf}"
          + "".join(f" {k}={v}" for k, v in cluster.env.items() if k != "SLURM_CONF"))
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
