"""Triton serving against local ONNX Runtime, on the same machine (``seg-bench triton``).

Two measurements, both with real ``seg-run`` processes as users run them:
- per-volume wall time (seg-run's own per-volume ``wall`` in its JSON, median of several runs)
  with ``--backend triton`` against the same model in local ONNX Runtime: the cost of sending
  slices to a server over loopback instead of running them in-process;
- total throughput of four concurrent seg-run clients against one, on one server with dynamic
  batching, and the batch sizes the server ran (from its statistics endpoint).

The server is nvidia-pytriton's CPU-only tritonserver on 127.0.0.1, serving the model through
Triton's Python backend running ONNX Runtime (``seg-export triton --python-backend``), so both
sides run the same ONNX Runtime on the same cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .stats import summarize


def _seg_run(args: list, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "runtime.cli", *map(str, args)], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError((r.stderr.strip().splitlines() or ["seg-run failed"])[-1])
    return r


def _walls(out: Path) -> dict[str, float]:
    return {p.stem: json.loads(p.read_text())["timings_s"]["wall"] for p in sorted(out.glob("*.json"))}


def per_volume_walls(inputs: Path, args: list, repeats: int, tmp: Path, tag: str) -> dict[str, list[float]]:
    """{volume: [wall per run]} over ``repeats`` seg-run invocations on every volume."""
    walls: dict[str, list[float]] = {}
    for r in range(repeats):
        out = tmp / f"{tag}-{r}"
        _seg_run([inputs, *args, "-o", out])
        for name, w in _walls(out).items():
            walls.setdefault(name, []).append(w)
    return walls


def server_batches(url: str, model: str) -> dict[int, int]:
    """{batch size: executions} from the server's statistics endpoint, so far."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)
    finally:
        client.close()
    out: dict[int, int] = {}
    for s in stats.get("model_stats", []):
        for b in s.get("batch_stats", []):
            out[int(b["batch_size"])] = out.get(int(b["batch_size"]), 0) + int(b["compute_infer"]["count"])
    return out


def concurrent_clients(inputs: Path, args: list, clients: int, tmp: Path, tag: str) -> float:
    """Seconds for ``clients`` seg-run processes, started together, to all finish the volumes."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", str(inputs), *map(str, args), "-o", str(tmp / f"{tag}-{i}")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(clients)
    ]
    errors = [p.communicate()[1] for p in procs if p.wait() != 0]
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError((errors[0].strip().splitlines() or ["seg-run failed"])[-1])
    return elapsed


def _delta(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    return {b: n - before.get(b, 0) for b, n in sorted(after.items()) if n - before.get(b, 0) > 0}


def run_triton_bench(
    model: Path,
    volumes: Path | None,
    repeats: int = 3,
    clients: int = 4,
    instances: int = 2,
    threads: int = 1,
    size: int = 128,
    slices: int = 32,
    cases: int = 2,
    batch: int | None = None,
    protocol: str = "grpc",
    echo=print,
) -> dict:
    """Both measurements; returns the report's payload."""
    from export.triton import export_repository
    from export.triton_server import LocalTritonServer
    from runtime.datasets import images_in
    from runtime.phantoms import write_phantoms

    with tempfile.TemporaryDirectory(prefix="triton-bench-") as t:
        tmp = Path(t)
        if volumes is None:
            write_phantoms(tmp / "data", cases=cases, seed=21, size=size, slices=slices, progress=False)
            volumes = tmp / "data"
        inputs = tmp / "inputs"
        inputs.mkdir()
        vols = images_in(volumes) if volumes.is_dir() else [volumes]
        for v in vols:  # only the images: label maps beside them are not segmented
            (inputs / v.name).symlink_to(v.resolve())
        export_repository(model, tmp / "repo", name="bench", python_backend=True, instances=instances, threads=threads)
        extra = ["--batch-size", batch] if batch else []
        echo(f"server: {instances} instance(s) of {threads or 'all'} thread(s); {len(vols)} volume(s)")
        local = per_volume_walls(inputs, ["--model", model, *extra], repeats, tmp, "local")
        with LocalTritonServer(tmp / "repo", log=tmp / "server.log") as server:
            url = server.grpc_url if protocol == "grpc" else server.http_url
            targs = ["--backend", "triton", "--url", url, "--model-name", "bench", "--protocol", protocol, *extra]
            _seg_run([inputs, *targs, "-o", tmp / "warm"])  # the stubs' first requests
            triton = per_volume_walls(inputs, targs, repeats, tmp, "triton")
            n_slices = sum(json.loads(p.read_text())["slices"] for p in (tmp / "warm").glob("*.json"))
            before = server_batches(server.grpc_url, "bench")
            one = concurrent_clients(inputs, targs, 1, tmp, "one")
            mid = server_batches(server.grpc_url, "bench")
            many = concurrent_clients(inputs, targs, clients, tmp, "many")
            after = server_batches(server.grpc_url, "bench")
    rows = []
    for name in sorted(local):
        lo, tr = float(np.median(local[name])), float(np.median(triton[name]))
        rows.append({"volume": name, "local_wall_s": summarize(local[name]), "triton_wall_s": summarize(triton[name])})
        rows[-1]["ratio"] = tr / lo
    total_local = sum(float(np.median(v)) for v in local.values())
    total_triton = sum(float(np.median(v)) for v in triton.values())
    t1, tn = n_slices / one, clients * n_slices / many
    return {
        "model": str(model),
        "protocol": protocol,
        "server": {"instances": instances, "threads_per_instance": threads, "backend": "python (ONNX Runtime)"},
        "repeats": repeats,
        "per_volume": rows,
        "wall_ratio": total_triton / total_local,
        "concurrency": {
            "clients": clients,
            "slices_per_client": n_slices,
            "one_client_s": one,
            "many_clients_s": many,
            "one_client_slices_s": t1,
            "many_clients_slices_s": tn,
            "throughput_ratio": tn / t1,
            "server_batches_one_client": _delta(mid, before),
            "server_batches_many_clients": _delta(after, mid),
        },
    }


def triton_markdown(rep: dict) -> str:
    c = rep["concurrency"]
    out = [
        "# Triton serving against local ONNX Runtime",
        "",
        f"Model {Path(rep['model']).name}; server: nvidia-pytriton tritonserver, Python backend running ONNX Runtime, "
        f"{rep['server']['instances']} instance(s) x {rep['server']['threads_per_instance'] or 'all'} thread(s); "
        f"client over {rep['protocol']} on loopback. Medians of {rep['repeats']} runs.",
        "",
        "| volume | local wall (s) | Triton wall (s) | ratio |",
        "|---|---|---|---|",
    ]
    for r in rep["per_volume"]:
        out.append(
            f"| {r['volume']} | {r['local_wall_s']['median']:.2f} | {r['triton_wall_s']['median']:.2f} | "
            f"{r['ratio']:.2f}x |"
        )
    out += [
        "",
        f"Per-volume wall, Triton / local (sum of medians): **{rep['wall_ratio']:.2f}x**",
        "",
        f"{c['clients']} concurrent seg-run clients against 1 (each segments {c['slices_per_client']} slices): "
        f"{c['one_client_slices_s']:.1f} -> {c['many_clients_slices_s']:.1f} slices/s, "
        f"throughput ratio **{c['throughput_ratio']:.2f}x**",
        "",
        f"Server batch sizes (size: executions), one client: {c['server_batches_one_client']}; "
        f"{c['clients']} clients: {c['server_batches_many_clients']}",
    ]
    return "\n".join(out) + "\n"
