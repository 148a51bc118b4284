"""Latency suite: per-slice inference latency per batch size, and whole-volume end-to-end time
with its stage split, for each model; plus the seed-style PyTorch baseline.

Each model is measured in its own subprocess (``python -m benchmarks.latency WORKER_JSON``)
so that its peak resident memory is its own and a model that cannot run fails alone.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .stats import summarize


def real_slices(volume_paths: list[Path], spec, n: int = 16) -> np.ndarray:
    """Preprocessed slices from the middle of the first volume (real data, not random noise)."""
    from runtime.dicom import read_input  # a NIfTI file or a DICOM series
    from runtime.preprocess import make_batch

    vol = read_input(volume_paths[0])
    mid = vol.num_slices // 2
    lo = max(0, min(mid - n // 2, vol.num_slices - n))
    x = make_batch(vol.data, vol.spacing, spec.preprocess, lo, min(lo + n, vol.num_slices))
    reps = -(-n // len(x))
    return np.concatenate([x] * reps)[:n]


WARMUP_S = 1.0


def _timed(run, warmup: int, repeats: int, warmup_s: float = WARMUP_S, clock=time.perf_counter) -> list[float]:
    """Seconds per call over ``repeats`` calls, after at least ``warmup`` calls and, when
    ``warmup`` > 0, at least ``warmup_s`` seconds of them: the first calls of a batch size
    allocate memory and pick kernels, and a CPU's clock takes a moment to ramp up."""
    t0, done = clock(), 0
    while done < warmup or (warmup and clock() - t0 < warmup_s):
        run()
        done += 1
    times = []
    for _ in range(repeats):
        t = clock()
        run()
        times.append(clock() - t)
    return times


def _batch_of(x: np.ndarray, batch: int) -> np.ndarray:
    return np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))


def batch_latency(infer, x: np.ndarray, batch: int, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``infer`` on ``batch`` slices, after ``warmup`` calls."""
    xb = _batch_of(x, batch)
    return _timed(lambda: infer(xb), warmup, repeats)


def slice_times(backend, x: np.ndarray, batch: int, warmup: int, repeats: int) -> list[float]:
    """Seconds per slice in steady state, as the pipeline drives the backend: each repeat
    submits ``backend.in_flight`` batches, which run at once (CPU streams, TensorRT slots),
    and collects them all. For a backend that runs one batch at a time, latency / batch."""
    xb, k = _batch_of(x, batch), max(1, backend.in_flight)

    def run() -> None:
        for token in [backend.submit(xb) for _ in range(k)]:
            backend.collect(token)

    return [t / (k * batch) for t in _timed(run, warmup, repeats)]


def measure_model(
    model: str,
    volumes: list[str],
    batches: list[int],
    backend: str,
    threads: int,
    warmup: int,
    repeats: int,
    volume_repeats: int,
    vol_batch: int | None,
    streams: int = 0,
    url: str | None = None,
    protocol: str = "grpc",
) -> dict:
    """Everything for one model (runs inside the worker subprocess); with backend "triton",
    ``model`` is a model name on the server at ``url``."""
    import onnx

    from runtime.cli import segment_files
    from runtime.models import open_backend

    from .flops import conv_flops

    out: dict = {"model": model, "rows": [], "volumes": []}
    with open_backend(model, backend, "auto", threads, streams=streams, url=url, protocol=protocol) as be:
        out.update(
            backend=be.name,
            provider=be.provider,
            precision=be.precision,
            in_flight=be.in_flight,
            describe=be.describe(),
        )
        flops = conv_flops(onnx.load(model)) if model.endswith(".onnx") else None
        out["gflop_per_slice"] = flops / 1e9 if flops else None
        x = real_slices([Path(v) for v in volumes], be.spec)
        for b in batches:
            if b < be.min_batch or (be.max_batch and b > be.max_batch):
                continue
            s = summarize(np.array(slice_times(be, x, b, warmup, repeats)) * 1000)
            latency = summarize(np.array(batch_latency(be.infer, x, b, warmup, repeats)) * 1000)
            out["rows"].append(
                {
                    "batch": b,
                    "per_slice_ms": s,
                    "batch_latency_ms": latency,
                    "throughput_slices_s": 1000 / s["median"],
                    "gflops": (flops / 1e9) / (s["median"] / 1000) if flops else None,
                }
            )
        bs = vol_batch or be.default_batch
        with tempfile.TemporaryDirectory() as tmp:
            device = getattr(be, "device_times_ms", None) or {}  # TensorRT's copy and compute time, summed
            for v in volumes:
                runs = []
                for _ in range(volume_repeats):
                    device.update(dict.fromkeys(device, 0.0))
                    res = segment_files([Path(v)], be, Path(tmp), bs, echo=lambda *a, **k: None)[Path(v)]
                    if isinstance(res, str):
                        raise RuntimeError(res)
                    runs.append({**res["timings_s"], "device_ms": dict(device)})
                walls = [r["wall"] for r in runs]
                best = runs[int(np.argsort(walls)[len(walls) // 2])]
                out["volumes"].append(
                    {
                        "volume": Path(v).name,
                        "input_format": res.get("input_format", "nifti"),  # "read" is the DICOM read for "dicom"
                        "batch": bs,
                        "slices": best["slices"],
                        "wall_s": summarize(walls),
                        "stages_s": {k: best[k] for k in ("read", "preprocess", "infer", "postprocess", "write")},
                        "device_ms": best["device_ms"],
                    }
                )
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def measure_torch_baseline(
    checkpoint: str, volumes: list[str], warmup: int, repeats: int, threads: int, volume_repeats: int = 1
) -> dict:
    """The seed's approach: PyTorch eager, one slice at a time, sequential preprocessing."""
    import torch

    from runtime.dicom import read_input
    from runtime.io import write_mask
    from runtime.postprocess import postprocess
    from runtime.preprocess import SliceBatcher, logits_to_labels
    from train.checkpoint import load_checkpoint

    if threads:
        torch.set_num_threads(threads)
    ck = load_checkpoint(checkpoint)
    model = ck.model()
    spec = ck.spec
    out: dict = {
        "model": checkpoint,
        "backend": "pytorch-eager",
        "provider": "cpu",
        "precision": "fp32",
        "rows": [],
        "volumes": [],
    }
    x = real_slices([Path(v) for v in volumes], spec)
    with torch.inference_mode():

        def infer(b):
            return model(torch.from_numpy(b)).numpy()

        s = summarize(np.array(batch_latency(infer, x, 1, warmup, repeats)) * 1000)
        out["rows"].append(
            {
                "batch": 1,
                "per_slice_ms": s,
                "batch_latency_ms": s,
                "throughput_slices_s": 1000 / s["median"],
                "gflops": None,
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            for v in volumes:
                walls = []
                for _ in range(volume_repeats):
                    t0 = time.perf_counter()
                    vol = read_input(v)
                    batcher = SliceBatcher(vol.data, vol.spacing, spec.preprocess)  # each slice preprocessed once
                    labels = np.empty(vol.data.shape, np.uint8)
                    for k in range(vol.num_slices):
                        labels[k] = logits_to_labels(infer(batcher(k, k + 1)), batcher.grid)[0]
                    write_mask(postprocess(labels), vol, Path(tmp) / "mask.nii.gz")
                    walls.append(time.perf_counter() - t0)
                out["volumes"].append(
                    {
                        "volume": Path(v).name,
                        "batch": 1,
                        "slices": int(vol.num_slices),
                        "wall_s": summarize(walls),
                        "stages_s": None,
                    }
                )
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_worker(job: dict) -> dict:
    """Run one measurement job in a fresh interpreter; errors come back as {'error': line}."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.latency", json.dumps(job)], capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        err = (r.stderr.strip().splitlines() or ["worker failed"])[-1]
        return {"model": job.get("model") or job.get("checkpoint"), "error": err[:300]}
    return json.loads(lines[-1])


def _main() -> None:
    job = json.loads(sys.argv[1])
    try:
        if job.get("kind") == "torch":
            res = measure_torch_baseline(
                job["checkpoint"],
                job["volumes"],
                job["warmup"],
                job["repeats"],
                job["threads"],
                job.get("volume_repeats", 1),
            )
        else:
            res = measure_model(
                job["model"],
                job["volumes"],
                job["batches"],
                job["backend"],
                job["threads"],
                job["warmup"],
                job["repeats"],
                job["volume_repeats"],
                job.get("vol_batch"),
                job.get("streams", 0),
                job.get("url"),
                job.get("protocol", "grpc"),
            )
    except Exception as exc:  # reported per model by the parent
        print(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(res))


if __name__ == "__main__":
    _main()
