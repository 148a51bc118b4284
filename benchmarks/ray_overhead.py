"""What seg-run --ray costs on one machine: the same volumes, model and cores, with and without Ray.

Generates phantoms, starts a local Ray cluster (nodes on loopback, CPUs = this machine's cores), then
alternates plain single-process segmentation (``segment_files`` with the backend's default streams, as
seg-run runs it) and the cluster job (``run_cluster``, one actor per CPU, each opening its own backend
inside the timed run). Reports the median wall time of each, their ratio (goal: <= 1.15), and each
actor's throughput. The cluster's start-up (a few seconds, once per job) is reported on its own.

    python -m benchmarks.ray_overhead --volumes 20 --repeats 3 --out ray_overhead.json
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import click


def make_volumes(folder: Path, n: int, size: int, slices: int) -> list[Path]:
    from runtime.io import write_nifti
    from runtime.phantoms import make_phantom, phantom_images

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img, _ = phantom_images(make_phantom(77, i, size=size, slices=slices))
        paths.append(write_nifti(img, folder / f"vol{i:02d}.nii.gz"))
    return paths


def plain_run(paths: list[Path], model: Path, out: Path) -> float:
    from runtime.cli import segment_files
    from runtime.models import open_backend

    t = time.perf_counter()
    with open_backend(model) as be:
        res = segment_files(paths, be, out, be.default_batch, echo=lambda *a, **k: None)
    wall = time.perf_counter() - t
    assert not [r for r in res.values() if isinstance(r, str)], res
    return wall


def ray_run(paths: list[Path], model: Path, out: Path) -> tuple[float, list[dict]]:
    from runtime.cluster import VolumeJob, run_cluster

    job = VolumeJob(model=str(model), out_dir=str(out))
    t = time.perf_counter()
    rows = run_cluster([(p, None) for p in paths], job)
    wall = time.perf_counter() - t
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["status"] != "ok"]
    return wall, rows


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--volumes", default=20, show_default=True, type=click.IntRange(1), help="Phantoms to segment.")
@click.option("--size", default=128, show_default=True, type=click.IntRange(16), help="In-plane voxels per phantom.")
@click.option("--slices", default=24, show_default=True, type=click.IntRange(4), help="Slices per phantom.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1), help="Timed runs of each mode.")
@click.option("-m", "--model", type=click.Path(path_type=Path), help="Model (default: the embedded demo model).")
@click.option("--out", type=click.Path(path_type=Path), help="Write the numbers as JSON here.")
def main(volumes, size, slices, repeats, model, out) -> None:
    """Overhead of seg-run --ray against plain seg-run on this machine's cores.

    \b
    Example:
      python -m benchmarks.ray_overhead --volumes 20 --repeats 3
    """
    from runtime.backends.onnxrt import cpu_count
    from runtime.cluster import connect, import_ray
    from runtime.models import demo_model_path

    model = (model or demo_model_path()).absolute()
    cores = cpu_count()
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as tmp:
        root = Path(tmp)
        click.echo(f"writing {volumes} phantoms ({size}x{size}, {slices} slices) ...", err=True)
        paths = make_volumes(root / "in", volumes, size, slices)
        os.environ["HOME"] = str(root)  # Ray writes its cluster auth token under $HOME/.ray: keep it temporary
        t = time.perf_counter()
        connect("local", num_cpus=cores)
        startup = time.perf_counter() - t
        ray = import_ray()
        plain, cluster, actors = [], [], {}
        try:
            for i in range(repeats):
                plain.append(plain_run(paths, model, _fresh(root / f"plain{i}")))
                wall, rows = ray_run(paths, model, _fresh(root / f"ray{i}"))
                cluster.append(wall)
                for r in rows:
                    a = actors.setdefault(f"{i}:{r['pid']}", {"volumes": 0, "slices": 0, "seconds": 0.0})
                    a["volumes"] += 1
                    a["slices"] += r["slices"]
                    a["seconds"] += r["seconds"]
                click.echo(f"run {i + 1}/{repeats}: plain {plain[-1]:.2f}s, ray {cluster[-1]:.2f}s", err=True)
            # the same model on the same volumes: the cluster's masks are the plain run's, byte for byte
            differ = [p.name for p in (root / "plain0").glob("*_seg.nii.gz") if not _same(p, root / "ray0" / p.name)]
        finally:
            ray.shutdown()
    per_actor = [a["slices"] / a["seconds"] for a in actors.values() if a["seconds"] > 0]
    result = {
        "volumes": volumes,
        "shape": [size, size, slices],
        "cores": cores,
        "model": model.name,
        "repeats": repeats,
        "plain_s": plain,
        "ray_s": cluster,
        "plain_median_s": statistics.median(plain),
        "ray_median_s": statistics.median(cluster),
        "overhead_ratio": statistics.median(cluster) / statistics.median(plain),
        "ray_startup_s": startup,
        "actors_per_run": len(actors) / repeats,
        "actor_slices_per_s_median": statistics.median(per_actor) if per_actor else None,
        "actor_volumes_per_s_median": statistics.median(
            a["volumes"] / a["seconds"] for a in actors.values() if a["seconds"] > 0
        ),
        "plain_slices_per_s": volumes * slices / statistics.median(plain),
        "masks_differing": differ,
    }
    click.echo(
        f"plain seg-run {result['plain_median_s']:.2f}s, seg-run --ray {result['ray_median_s']:.2f}s (medians of "
        f"{repeats}): overhead {result['overhead_ratio']:.3f}x (goal <= 1.15); cluster start-up "
        f"{startup:.1f}s once per job; {result['actors_per_run']:.0f} actors at "
        f"{result['actor_slices_per_s_median']:.1f} slices/s each (plain: {result['plain_slices_per_s']:.1f} "
        "slices/s); "
        f"{len(differ)} of {volumes} masks differ from plain seg-run's"
    )
    if out:
        from runtime.io import write_json_atomic

        write_json_atomic(out, result)


def _same(a: Path, b: Path) -> bool:
    return b.exists() and a.read_bytes() == b.read_bytes()


def _fresh(p: Path) -> Path:
    p.mkdir(parents=True)
    return p


if __name__ == "__main__":
    main()
