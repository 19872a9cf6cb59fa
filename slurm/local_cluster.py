#!/usr/bin/env python3
"""A private, real Slurm cluster on this one machine, for running the job scripts unchanged.

    python3 slurm/local_cluster.py up|down|status|install [--dir DIR] [--nodes N] [--gpus G] [--partitions a,b,c]

`up` starts munged, slurmctld and one slurmd per node (n1, n2, ...), each declared bigger than the machine
(32 CPUs, 256 GiB, G fake GPUs) so that the scripts' `#SBATCH` lines are accepted; `source DIR/env.sh` then
points sbatch/squeue/... at it. `down` cancels every job, waits for them to end and stops the daemons it started.
Each setting's reason is in a comment beside it (tried with Debian 12's Slurm 22.05.8 and MUNGE 0.5.15; without
systemd, every daemon is a child in its own session, stopped by PID). Stdlib only; also importable:
`start(directory)` returns a `Cluster`, `stop(directory)` ends it.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / ".slurm"
DEFAULT_PARTITIONS = ("v100-1", "v100-2", "v100-4")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "squashfs-tools")
COMMANDS = ("slurmctld", "slurmd", "sbatch", "munged", "unsquashfs")
# Each node claims more than the machine has; config_overrides makes slurmd accept it (nothing is enforced).
NODE_CPUS, NODE_MEMORY_MB = 32, 262144


@dataclass
class Cluster:
    directory: Path
    node_names: list[str] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.directory / "slurm.conf"

    def env(self, base: dict | None = None) -> dict:
        """A copy of `base` (default os.environ) whose Slurm clients talk to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def stop(self) -> bool:
        return stop(self.directory)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def _install() -> None:
    if all(shutil.which(c) for c in COMMANDS):
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*sudo, "apt-get", "update"], check=True)
    subprocess.run([*sudo, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y",
                    "--no-install-recommends", *PACKAGES], check=True)


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open together so the n ports differ; the daemons bind them a moment later.
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ours(pid: int, directory: Path) -> bool:
    """Alive and started for this directory: guards against a recycled PID (a zombie has an empty cmdline)."""
    try:
        return f"{directory}/".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _reap(pid: int) -> None:
    # Daemons started from this process (API use in pytest) become zombies until waited for.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _socket_dir(directory: Path) -> Path:
    """Where munged's socket lives: outside DIR, since munged wants every folder above its socket to be
    world-executable (pytest's tmp_path is 0700) and a socket path to stay under 108 characters."""
    digest = hashlib.sha1(str(directory).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"local-slurm-{os.getuid()}-{digest}"


def _recorded(directory: Path) -> dict[str, int]:
    try:
        return json.loads((directory / "pids.json").read_text())
    except (OSError, ValueError):
        return {}


def running(directory: Path) -> dict[str, int]:
    """The recorded daemons of the cluster in `directory` that are still alive."""
    directory = Path(directory).resolve()
    alive = {}
    for name, pid in _recorded(directory).items():
        _reap(pid)
        if _ours(pid, directory):
            alive[name] = pid
    return alive


def _conf_text(d: Path, sock: Path, host: str, nodes: list[str], ports: list[int], gpus: int,
               partitions: list[str]) -> str:
    lines = [
        "ClusterName=local",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ports[0]}",
        f"SlurmUser={_user()}",
        f"SlurmdUser={_user()}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire=5: a requeued job restarts in ~7 s instead of 120 s.
        f"AuthInfo=socket={sock},cred_expire=5",
        f"StateSaveLocation={d}/state",
        f"SlurmdSpoolDir={d}/spool/%n",
        f"SlurmctldPidFile={d}/run/slurmctld.pid",
        f"SlurmdPidFile={d}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={d}/log/slurmctld.log",
        f"SlurmdLogFile={d}/log/slurmd-%n.log",
        "SlurmdParameters=config_overrides",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=bf_interval=1,sched_interval=2",
        # Stages after a failed stage are cancelled instead of pending forever.
        "DependencyParameters=kill_invalid_depend",
        # Impossible requests are rejected at submit time instead of pending forever.
        "EnforcePartLimits=ALL",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "ReturnToService=2",
        # No sacct without slurmdbd: `scontrol show job` keeps finished jobs for an hour instead.
        "MinJobAge=3600",
        "KillWait=10",
        "InactiveLimit=0",
    ]
    if gpus:
        lines.append("GresTypes=gpu")
    for name, port in zip(nodes, ports[1:]):
        gres = f" Gres=gpu:{gpus}" if gpus else ""
        lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={NODE_CPUS} "
                     f"RealMemory={NODE_MEMORY_MB}{gres} State=UNKNOWN")
    for i, part in enumerate(dict.fromkeys(["debug", *partitions])):
        lines.append(f"PartitionName={part} Nodes=ALL Default={'YES' if i == 0 else 'NO'} "
                     "MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def _tail(directory: Path, lines: int = 15) -> str:
    out = []
    for log in sorted((directory / "log").glob("*.out")):  # the daemons' stderr: holds their fatal errors
        text = log.read_text(errors="replace").splitlines()[-lines:]
        if text:
            out.append(f"--- {log}\n" + "\n".join(text))
    return "\n".join(out)


def _node_states(env: dict) -> dict[str, str]:
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True, text=True, timeout=10)
    # -N lists a node once per partition; a dict keeps one entry each.
    return dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)


def start(directory: Path = DEFAULT_DIR, nodes: int = 2, gpus: int = 4,
          partitions=DEFAULT_PARTITIONS, timeout: float = 60.0) -> Cluster:
    """Start a fresh cluster in `directory`; raises RuntimeError (with the daemons' log tails) on failure."""
    d = Path(directory).resolve()
    if nodes < 1 or gpus < 0:
        raise ValueError(f"need nodes >= 1 and gpus >= 0, got {nodes} and {gpus}")
    if running(d):
        raise RuntimeError(f"a cluster recorded in {d} is still running: stop it first (local_cluster.py down)")
    if d.exists():
        # Only wipe what is recognisably a previous (dead) cluster, never an unrelated folder.
        if any(d.iterdir()) and not ((d / "slurm.conf").exists() or (d / "pids.json").exists()):
            raise RuntimeError(f"{d} exists and is not a local cluster directory: refusing to delete it")
        shutil.rmtree(d)
    _install()

    cluster = Cluster(d, [f"n{i}" for i in range(1, nodes + 1)])
    for sub in ("munge", "state", "run", "log", *(f"spool/{n}" for n in cluster.node_names)):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "munge").chmod(0o700)  # munged refuses a key that others could reach
    sock = _socket_dir(d) / "munge.socket"
    shutil.rmtree(sock.parent, ignore_errors=True)  # a dead cluster's leftover
    sock.parent.mkdir(mode=0o755)
    sock.parent.chmod(0o755)  # whatever the umask: munged needs it world-executable
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    # Fake GPUs: gres.conf needs device files, and refuses regular files; symlinks to /dev/null pass.
    gres = []
    for n in cluster.node_names if gpus else ():
        (d / "fakedev" / n).mkdir(parents=True)
        for g in range(gpus):
            (d / "fakedev" / n / f"nvidia{g}").symlink_to("/dev/null")
        gres.append(f"NodeName={n} Name=gpu File={d}/fakedev/{n}/nvidia[0-{gpus - 1}]")
    (d / "gres.conf").write_text("\n".join(gres) + "\n")
    host = socket.gethostname().split(".")[0]
    ports = _free_ports(1 + nodes)
    cluster.conf.write_text(_conf_text(d, sock, host, cluster.node_names, ports, gpus, list(partitions)))

    conf = str(cluster.conf)
    daemons = {
        "munged": ["munged", "-F", f"--key-file={key}", f"--socket={sock}",
                   f"--pid-file={d}/run/munged.pid", f"--log-file={d}/log/munged.log",
                   f"--seed-file={d}/munge/munged.seed"],
        "slurmctld": ["slurmctld", "-D", "-f", conf],
        **{f"slurmd-{n}": ["slurmd", "-D", "-f", conf, "-N", n] for n in cluster.node_names},
    }
    procs, pids = {}, {}
    try:
        for name, cmd in daemons.items():
            with open(d / "log" / f"{name}.out", "wb") as out:
                # Own session: the daemons outlive `up` and ignore a Ctrl-C sent to the user's terminal.
                procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                               start_new_session=True, env=cluster.env())
            pids[name] = procs[name].pid
            (d / "pids.json").write_text(json.dumps(pids, indent=1) + "\n")  # recorded at once, for cleanup
            if name == "munged":  # slurmctld fails at once without a munge socket
                _wait(sock.exists, procs, timeout, "munged socket")
        env = cluster.env()

        def all_idle() -> bool:
            states = _node_states(env)
            return all(states.get(n) == "idle" for n in cluster.node_names)

        _wait(all_idle, procs, timeout, "every node idle")
    except BaseException as e:
        logs = _tail(d)
        stop(d)
        if isinstance(e, RuntimeError):
            raise RuntimeError(f"{e}\n{logs}") from None
        raise
    (d / "env.sh").write_text(f"export SLURM_CONF={shlex.quote(conf)}\n")
    return cluster


def _wait(ready, procs: dict, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for name, p in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with status {p.returncode} while waiting for {what}")
        try:
            if ready():
                return
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.3)


def stop(directory: Path = DEFAULT_DIR, timeout: float = 60.0) -> bool:
    """Cancel every job, wait for them to end, stop the recorded daemons. False if nothing was running."""
    d = Path(directory).resolve()
    alive = running(d)
    if "slurmctld" in alive:
        # Killing slurmd would leave running jobs alive: cancel them first and wait until they are gone.
        env = Cluster(d).env()
        subprocess.run(["scancel", "--full", "-u", _user()], env=env, capture_output=True, timeout=30)
        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True, timeout=30)
            if r.returncode != 0 or not r.stdout.strip():
                break
            if time.monotonic() > deadline:
                print(f"warning: jobs still listed after {timeout:.0f} s, stopping anyway:\n{r.stdout}",
                      file=sys.stderr)
                break
            time.sleep(0.5)
    # Only the recorded PIDs, newest first (slurmd, slurmctld, then munged they authenticate with); never by name.
    for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        for pid in reversed(list(alive.values())):
            if _ours(pid, d):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while running(d) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not running(d):
            break
    (d / "pids.json").unlink(missing_ok=True)
    shutil.rmtree(_socket_dir(d), ignore_errors=True)
    return bool(alive)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("up", "down", "status", "install"))
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="cluster directory (default: %(default)s)")
    ap.add_argument("--nodes", type=int, default=2, help="number of nodes n1..nN (default: %(default)s)")
    ap.add_argument("--gpus", type=int, default=4, help="fake GPUs per node (default: %(default)s)")
    ap.add_argument("--partitions", default=",".join(DEFAULT_PARTITIONS),
                    help="partitions besides the default 'debug' (default: %(default)s)")
    args = ap.parse_args(argv)
    d = args.dir.resolve()
    cluster = Cluster(d)
    if args.command == "install":  # what `up` does first; CI calls it on its own
        _install()
        print("installed:", ", ".join(shutil.which(c) for c in COMMANDS))
    elif args.command == "up":
        try:
            start(d, args.nodes, args.gpus, [p for p in args.partitions.split(",") if p])
        except (RuntimeError, ValueError, subprocess.CalledProcessError) as e:
            print(f"local_cluster up failed: {e}", file=sys.stderr)
            return 1
        print(f"Slurm cluster up: run `source {d / 'env.sh'}` (or `export SLURM_CONF={cluster.conf}`)")
    elif args.command == "down":
        print("Slurm cluster stopped" if stop(d) else f"no Slurm cluster running in {d}")
    else:
        alive = running(d)
        print(f"{'running' if alive else 'not running'}: {d}  ({', '.join(alive) or 'no daemons'})")
        print(f"SLURM_CONF={cluster.conf}")
        if alive:
            r = subprocess.run(["sinfo"], env=cluster.env(), capture_output=True, text=True, timeout=30)
            print(r.stdout + r.stderr, end="")
        return 0 if alive else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
