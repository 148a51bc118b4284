"""A two-node Ray cluster on this machine for one seg-run job (used by tests/test_cluster.py).

Usage: python -m tests.ray_nodes TEMP_DIR -- SEG-RUN ARGS. Starts a head and a worker with `ray start --block`
(1 CPU each, port 6390, outside Ray's default worker port range), waits for both, runs seg-run, and stops the
two nodes it started by PID; exits with seg-run's code. Run it where the only network is loopback
(`unshare -n`), so the nodes' addresses are 127.0.0.1 and nothing leaves the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

PORT = 6390


def ray_start(log: str, *args: str) -> subprocess.Popen:
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    with open(log, "ab") as out:
        return subprocess.Popen(
            [ray, "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for_port(timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"ray_nodes: the head did not listen on {PORT} in {timeout:.0f}s") from None
            time.sleep(0.5)


def wait_for_nodes(n: int, timeout: float = 90) -> None:
    import ray

    ray.init(address=f"127.0.0.1:{PORT}", _node_ip_address="127.0.0.1", configure_logging=False)
    try:
        deadline = time.monotonic() + timeout
        while sum(node["Alive"] for node in ray.nodes()) < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"ray_nodes: {n} nodes did not come up in {timeout:.0f}s")
            time.sleep(0.5)
    finally:
        ray.shutdown()


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the `ray start --block` process group (it stops its node's processes), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str]) -> int:
    temp, rest = argv[0], argv[argv.index("--") + 1 :]
    os.makedirs(temp, exist_ok=True)
    log = os.path.join(temp, "nodes.log")
    head = ray_start(log, "--head", f"--port={PORT}", "--include-dashboard=false", f"--temp-dir={temp}")
    worker = None
    try:
        wait_for_port()
        worker = ray_start(log, f"--address=127.0.0.1:{PORT}")
        wait_for_nodes(2)
        print("ray_nodes: 2 nodes up", file=sys.stderr, flush=True)
        return subprocess.run([os.path.join(os.path.dirname(sys.executable), "seg-run"), *rest]).returncode
    finally:
        for proc in (worker, head):
            if proc is not None:
                stop(proc)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
