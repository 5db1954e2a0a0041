"""A stand-in for a cluster node that the cluster launcher reaches over SSH: an OpenSSH server on
127.0.0.1 (a free port, a generated key), in mount and PID namespaces of its own.

Why the namespaces: the launcher runs ``ray stop`` on its nodes (at ``ray up`` and ``ray down``),
and ``ray stop`` ends every Ray process it can see. In a PID namespace it sees only the node's own
processes, not the test suite's Ray nor anything else on the machine. The node's home (/root, where
the launcher puts the project, the token and its bootstrap files) and its /tmp (where Ray keeps the
cluster's address file, which a plain ``ray.init()`` elsewhere would join) are directories of the
test, mounted only inside. The network is the machine's: everything listens on loopback. Killing
the namespace's first process (by PID) ends every process in it: nothing the node ran survives.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TOOLS = {"sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client", "rsync": "rsync"}
START_TIMEOUT_S = 20


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )


def why_not() -> str | None:
    """None when this machine can run a stand-in node; otherwise why not (the tests skip with it)."""
    if os.geteuid() != 0:
        return "needs root: the stand-in node is an SSH server for root in namespaces of its own"
    missing = sorted({package for name, package in TOOLS.items() if not tool(name)})
    if missing:
        return f"needs {', '.join(missing)} (apt-get install {' '.join(missing)}; .ci/run installs them)"
    probe = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"cannot make mount and PID namespaces here: {probe.stderr.strip()}"
    return None


def namespace_members(namespace: str) -> list[int]:
    """PIDs (as this machine numbers them) of the processes in PID namespace ``namespace``."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "pid") == namespace:
                    members.append(int(entry.name))
            except OSError:  # ended meanwhile, or not ours to read
                pass
    return members


@dataclass
class SshNode:
    host: str
    port: int
    user: str
    key: Path  # the private key that logs in
    home: Path  # the node's home directory, as seen from outside

    def proxy_command(self) -> str:
        """For the launcher's ``auth.ssh_proxy_command``: its config has no port setting."""
        return f"{sys.executable} {Path(__file__).parent / 'ssh_relay.py'} {self.host} {self.port}"


def _wait_for_port(host: str, port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd stopped: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"sshd did not answer on {host}:{port} within {START_TIMEOUT_S} s: {log.read_text()[-2000:]}")


@contextmanager
def ssh_node(root: Path) -> Iterator[SshNode]:
    """Start the node (its files under ``root``), yield it, and stop it with everything it ran."""
    home, node_tmp, config_dir = root / "home", root / "tmp", root / "home" / ".sshd"
    for folder in (home, node_tmp, config_dir):
        folder.mkdir(parents=True)
    key = root / "id_ed25519"
    subprocess.run([tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    subprocess.run(
        [tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(config_dir / "host_key")], check=True
    )
    shutil.copy(key.with_suffix(".pub"), config_dir / "authorized_keys")
    (home / ".bashrc").write_text("")  # the cluster's set-up adds its lines
    port = free_port()
    # Paths as the node sees them: its home is mounted at /root.
    (config_dir / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey /root/.sshd/host_key\n"
        "AuthorizedKeysFile /root/.sshd/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "PrintMotd no\nSubsystem sftp internal-sftp\n"
    )
    # The node's home hides this machine's; a Python installed under it (pyenv, for one: the venv's
    # interpreter links there) stays visible at the same path.
    keep = ""
    interpreter, real_home = Path(os.path.realpath(sys.executable)), Path.home()
    if interpreter.is_relative_to(real_home):
        top = interpreter.relative_to(real_home).parts[0]
        (home / top).mkdir()
        keep = f"mount --bind {real_home / top} {home / top}; "
    # So does this checkout (the node links its .venv), wherever it is cloned: under /tmp or /root
    # it is bound into the folder that will stand there.
    checkout = Path(__file__).resolve().parents[1]
    for hidden, standing in ((Path("/root"), home), (Path("/tmp"), node_tmp)):
        if checkout.is_relative_to(hidden):
            (standing / checkout.relative_to(hidden)).mkdir(parents=True, exist_ok=True)
            keep += f"mount --bind {checkout} {standing / checkout.relative_to(hidden)}; "
    script = (
        f"set -e; {keep}mount --rbind {home} /root; mount --rbind {node_tmp} /tmp; mkdir -p /run/sshd; "
        f"exec {tool('sshd')} -D -e -f /root/.sshd/sshd_config"
    )
    log = root / "sshd.log"
    with log.open("w") as stderr:
        # --kill-child: if unshare dies, the namespace's first process (sshd) is killed, and with it
        # every process in the namespace.
        process = subprocess.Popen(
            ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
        )
    namespace = None
    try:
        _wait_for_port("127.0.0.1", port, process, log)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        namespace = os.readlink(f"/proc/{children[0]}/ns/pid")
        yield SshNode(host="127.0.0.1", port=port, user="root", key=key, home=home)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        left: list[int] = []
        if namespace is not None:
            deadline = time.monotonic() + 10
            while (left := namespace_members(namespace)) and time.monotonic() < deadline:
                time.sleep(0.2)
        if left:
            raise RuntimeError(f"processes of the stand-in node survived it: {left}")
