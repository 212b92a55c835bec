"""Starting a group from a host file: `mlxq serve|generate|chat MODEL --hosts HOSTS`.

The host file is `mlx.launch`'s: a JSON list of hosts (or {"hosts": [...]}), each {"ssh": name, "ips": [ip, ...]};
the first is rank 0, this process. Each other rank is started here when its address is loopback, else over ssh
(the same Python, the same working directory and model path on every host, as `mlx.launch` expects), running
`python -m mlxq.distributed.worker`. The ring listens on each host's first IP at `ring_port + rank`.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mlxq.distributed.control import CONNECT_TIMEOUT_S
from mlxq.errors import ConfigError, InvalidRequest

log = logging.getLogger("mlxq.distributed")

DEFAULT_RING_PORT = 32323


def free_loopback_ports(n: int) -> int:
    """The first of `n` consecutive free loopback ports: a ring of `n` local ranks (`--ring-port`, `mlx.launch -p`)."""
    import socket

    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        try:
            for port in range(base + 1, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise ConfigError(f"no {n} consecutive free loopback ports")


def read_hosts(path: str) -> list[dict]:
    """The hosts of an `mlx.launch` host file, each with an "ssh" name and at least one IP."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable JSON host file ({e})") from None
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or len(hosts) < 2:
        raise ConfigError(f"{path}: 'hosts' must list at least two hosts")
    for i, h in enumerate(hosts):
        if not isinstance(h, dict) or not isinstance(h.get("ssh"), str) or not h.get("ips"):
            raise ConfigError(f"{path}: hosts[{i}] needs an 'ssh' name and 'ips' (the ring uses IP addresses)")
        for ip in h["ips"]:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ConfigError(f"{path}: hosts[{i}].ips: '{ip}' is not an IP address") from None
    return hosts


def _local(host: dict) -> bool:
    return host["ssh"] in ("localhost", "127.0.0.1") or ipaddress.ip_address(host["ips"][0]).is_loopback


class Launch:
    """The ranks started for this process (rank 0): their processes, ended when it exits."""

    def __init__(self, hosts_path: str, worker_args: list[str], ring_port: int = DEFAULT_RING_PORT):
        hosts = read_hosts(hosts_path)
        ring = [[f"{h['ips'][0]}:{ring_port + rank}"] for rank, h in enumerate(hosts)]
        fd, self.ring_file = tempfile.mkstemp(prefix="mlxq-ring-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(ring, f)
        self.size = len(hosts)
        self.children: list[subprocess.Popen] = []
        atexit.register(self.stop)
        command = [sys.executable, "-m", "mlxq.distributed.worker", *worker_args]
        for rank, host in enumerate(hosts[1:], start=1):
            env = {"MLX_RANK": str(rank), "MLXQ_NO_REEXEC": "1"}
            if _local(host):
                env = {**os.environ, **env, "MLX_HOSTFILE": self.ring_file}
                self.children.append(subprocess.Popen(command, env=env))
            else:
                exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
                script = (f"f=$(mktemp); printf %s {shlex.quote(json.dumps(ring))} > $f; cd {shlex.quote(os.getcwd())}"
                          f" && MLX_HOSTFILE=$f {exports} exec {shlex.join(command)}")
                self.children.append(subprocess.Popen(["ssh", host["ssh"], script]))
        os.environ.update({"MLX_HOSTFILE": self.ring_file, "MLX_RANK": "0"})

    def group(self, timeout: float = CONNECT_TIMEOUT_S):
        """This process's membership of the ring (rank 0), once every rank has joined it. MLX waits for the ring
        without a time limit, so it waits on a thread here while the ranks started are watched: one that exits
        first, or a ring not formed within `timeout`, is an error rather than a hang."""
        import mlx.core as mx

        box: dict = {}

        def join() -> None:
            try:
                box["group"] = mx.distributed.init(backend="ring", strict=True)
            except RuntimeError as e:
                box["error"] = e

        thread = threading.Thread(target=join, name="mlxq-ring-join", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while thread.is_alive():
            thread.join(0.2)
            for rank, child in enumerate(self.children, start=1):
                if child.poll() is not None:
                    self.stop()
                    raise ConfigError(f"distributed: rank {rank} exited (status {child.returncode}) before "
                                      "joining the ring")
            if time.monotonic() > deadline:
                self.stop(timeout=0)
                raise ConfigError(f"distributed: the ring did not form within {timeout:.0f} s")
        if "error" in box:
            self.stop(timeout=0)
            raise ConfigError(f"distributed: cannot form the ring ({box['error']})")
        return box["group"]

    def stop(self, timeout: float = 10.0) -> None:
        """Waits for the ranks to leave (after the group was shut down), then ends those still running."""
        for child in self.children:
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                child.terminate()
                try:
                    child.wait(5)
                except subprocess.TimeoutExpired:
                    child.kill()
        self.children = []
        if os.path.exists(self.ring_file):
            os.unlink(self.ring_file)


def load_on_hosts(model: str | None, hosts_path: str, parallel: str | None, *, keep_quantized: bool = False,
                  experts_per_tok: int | None = None, expert_memory: str | None = None,
                  expert_options: dict | None = None, ring_port: int = DEFAULT_RING_PORT,
                  rank_timeout: float | None = None):
    """`mlxq.load(model, group=...)` on rank 0 of a group started from `hosts_path`. The group is shut down and its
    processes ended when this process exits."""
    from mlxq.distributed.control import RANK_TIMEOUT_S
    from mlxq.distributed.group import load_group

    if model is None:
        raise InvalidRequest("--hosts: name the model (every rank loads it from the same path)")
    args = [model] + (["--parallel", parallel] if parallel else []) + (["--keep-quantized"] if keep_quantized else [])
    args += ["--experts-per-tok", str(experts_per_tok)] if experts_per_tok else []
    args += ["--expert-memory", str(expert_memory)] if expert_memory is not None else []
    args += ["--expert-options", json.dumps(expert_options)] if expert_options else []
    launch = Launch(hosts_path, args, ring_port)
    loaded = load_group(model, launch.group(), parallel=parallel, keep_quantized=keep_quantized or None,
                        experts_per_tok=experts_per_tok, expert_memory=expert_memory, expert_options=expert_options,
                        rank_timeout=rank_timeout or RANK_TIMEOUT_S)
    atexit.register(lambda: (loaded.shutdown(), launch.stop()))
    return loaded
