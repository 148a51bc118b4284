"""seg-run's cluster mode: a cohort of volumes segmented by Ray Data actors, one result row per volume.

Each actor opens the backend once and runs the single-process code (``segment_files``) on one volume
at a time, so masks are byte-identical to plain seg-run and resume follows the same skip rule. A
volume that fails becomes a failed row; it never fails the job. Ray is imported lazily: without the
``ray`` extra, ``--ray`` says what to install.
"""

from __future__ import annotations

import csv
import ipaddress
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, SegError, first_line, require

RAY_EXTRA = "ray"
MANIFEST_PATH_COLUMN = "path"
MANIFEST_CASE_COLUMN = "case_id"
# result columns, in the order they are written
COLUMNS = (
    "case_id",
    "input",
    "status",
    "error",
    "mask",
    "report",
    "liver_ml",
    "tumor_ml",
    "tumor_count",
    "slices",
    "seconds",
    "infer_s",
    "attempt_started",
    "node_id",
    "node_ip",
    "pid",
    "backend",
)
RETRIES = 2  # restarts of a lost actor, and retries of the volume it held


def import_ray():
    """The ray module, or a MissingDependency naming the extra."""
    hint = 'pip install "unet-edge[ray]"'
    ray = require("ray", RAY_EXTRA, "seg-run --ray", hint=hint)
    require("ray.data", RAY_EXTRA, "seg-run --ray", hint=hint)
    return ray


@dataclass(frozen=True)
class VolumeJob:
    """What every actor needs to segment a volume exactly as plain seg-run would (picklable)."""

    model: str
    out_dir: str
    backend: str = "auto"
    provider: str = "auto"
    cpus: int = 1
    batch_size: int | None = None
    skip_existing: bool = False
    postprocess: bool = True
    holes: bool = False
    overlay: bool = False
    probabilities: bool = False
    min_tumour_ml: float = 0.0
    force: bool = False
    dicom_seg: bool = False
    resample_gaps: bool = False


def read_manifest(path: Path) -> list[tuple[Path, str | None]]:
    """(volume path, case id or None) per row of a CSV or Parquet manifest with a ``path`` column and an
    optional ``case_id`` column. Relative paths are taken from the manifest's own directory."""
    if not path.is_file():
        raise InputError(f"{path}: no such manifest; give a CSV or Parquet file with a '{MANIFEST_PATH_COLUMN}' column")
    if path.suffix.lower() in (".parquet", ".pq"):
        pq = require("pyarrow.parquet", RAY_EXTRA, "a Parquet manifest", hint='pip install "unet-edge[ray]"')
        try:
            rows = pq.read_table(str(path)).to_pylist()
        except Exception as exc:
            raise InputError(f"{path}: cannot read this Parquet manifest ({first_line(exc)})") from exc
    else:
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise InputError(f"{path}: cannot read this CSV manifest ({exc}); save it as UTF-8 CSV") from exc
    if not rows:
        raise InputError(f"{path}: the manifest has no rows; give one row per volume")
    if MANIFEST_PATH_COLUMN not in rows[0]:
        raise InputError(
            f"{path}: the manifest has no '{MANIFEST_PATH_COLUMN}' column (columns: {sorted(rows[0])}); "
            f"name the volume column '{MANIFEST_PATH_COLUMN}'"
        )
    out = []
    for i, row in enumerate(rows, start=2 if path.suffix.lower() == ".csv" else 1):
        value = str(row.get(MANIFEST_PATH_COLUMN) or "").strip()
        if not value:
            raise InputError(f"{path}: row {i} has an empty '{MANIFEST_PATH_COLUMN}'; give every row a volume path")
        p = Path(value)
        case = str(row.get(MANIFEST_CASE_COLUMN) or "").strip() or None
        if case is not None and (case in (".", "..") or any(ch in case for ch in "/\\\0")):
            raise InputError(f"{path}: row {i}: case id {case!r} is not a file name; use letters, digits, '-', '_'")
        out.append((p if p.is_absolute() else path.parent / p, case))
    return out


def output_names(items: list[tuple[Path, str | None]]) -> dict[Path, str]:
    """The output base name per input: its case id, else the name plain seg-run derives
    (runtime.outputs.output_names); two inputs that would write the same outputs are refused,
    since on a cluster they would race for the same files."""
    from .outputs import check_names
    from .outputs import output_names as derived_names

    cases: dict[Path, str | None] = {}
    for p, case in items:
        cases.setdefault(p, case)
    derived = derived_names([p for p, case in cases.items() if not case])
    names = {p: case or derived[p] for p, case in cases.items()}
    check_names(names)
    return names


def actor_resources(model: str | Path, backend: str, provider: str, cpus: int) -> dict[str, float]:
    """Ray resources per actor: a GPU for TensorRT plans and ONNX Runtime's GPU providers, else CPUs only."""
    from .models import choose_backend

    gpu = choose_backend(Path(model), backend) == "tensorrt" or provider in ("cuda", "tensorrt")
    return {"num_cpus": float(cpus), "num_gpus": 1.0 if gpu else 0.0}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]


class SegmentVolumes:
    """The Ray Data callable class: opens the backend once per actor, then segments one volume per row."""

    def __init__(self, job: VolumeJob):
        import ray

        from .models import open_backend

        self.job = job
        # ONNX Runtime's threads are the actor's CPUs, never the node's cores: actors share nodes
        streams = 1 if job.cpus == 1 else 0
        self.backend = open_backend(job.model, job.backend, job.provider, threads=job.cpus, streams=streams)
        self.backend.activate()
        self.batch_size = job.batch_size or self.backend.default_batch
        if self.backend.max_batch and self.batch_size > self.backend.max_batch:
            self.batch_size = self.backend.max_batch
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.describe = self.backend.describe()

    def __call__(self, batch: dict) -> dict:
        rows = [self.segment(str(p), str(c)) for p, c in zip(batch["path"], batch["case_id"])]
        return {k: [r[k] for r in rows] for k in COLUMNS}

    def segment(self, path: str, case_id: str) -> dict:
        from .cli import segment_files

        began = time.perf_counter()
        row = dict.fromkeys(COLUMNS, None)
        row.update(
            case_id=case_id,
            input=path,
            error="",
            mask="",
            report="",
            attempt_started=time.time(),
            node_id=self.node_id,
            node_ip=self.node_ip,
            pid=os.getpid(),
            backend=self.describe,
        )
        p, out_dir = Path(path), Path(self.job.out_dir)
        try:
            if self.job.resample_gaps:
                from .dicom import set_resample_gaps

                set_resample_gaps(True)
            result = segment_files(
                [p],
                self.backend,
                out_dir,
                self.batch_size,
                self.job.skip_existing,
                self.job.postprocess,
                self.job.holes,
                self.job.overlay,
                echo=lambda *a, **k: None,
                probabilities=self.job.probabilities,
                min_tumour_ml=self.job.min_tumour_ml,
                names={p: case_id},
                force=self.job.force,
                dicom_seg=self.job.dicom_seg,
            )[p]
        except Exception as exc:  # one volume's failure of any kind is its own row, never the job's
            result = f"{path}: {type(exc).__name__}: {exc}" if not isinstance(exc, SegError) else str(exc)
        if isinstance(result, str):
            row.update(status="failed", error=_one_line(result))
        else:
            report_path = out_dir / f"{case_id}.json"
            if result.get("skipped"):
                row["status"] = "skipped"
                result = _read_report(report_path)
            else:
                row["status"] = "ok"
            row.update(
                mask=str(result.get("mask", "")),
                report=str(report_path) if report_path.exists() else "",
                liver_ml=result.get("liver_ml"),
                tumor_ml=result.get("tumor_ml"),
                tumor_count=result.get("tumor_count"),
                slices=result.get("slices"),
                infer_s=(result.get("timings_s") or {}).get("infer"),
            )
        row["seconds"] = round(time.perf_counter() - began, 4)
        return row

    def __del__(self):
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.release()


def _read_report(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def keep_on_loopback() -> None:
    """Give the nodes of a cluster started on this machine the loopback address. Ray otherwise gives
    them the host's network address, even 127.0.0.1 passed as the node address, and a one-machine
    cluster has no reason to be reachable from the network."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read at import by the processes Ray starts
    import ray._private.ray_constants as constants

    constants.ENABLE_RAY_CLUSTER = False  # read when this process picks the node address


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a HOST:PORT where nothing listens (Ray itself retries for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise InputError(
            f"cannot connect to the Ray cluster at {address!r} ({exc.strerror or exc}); start its head with "
            "'ray start --head', check the address, or use --ray local"
        ) from exc


def connect(address: str, num_cpus: int | None = None) -> bool:
    """Connect to a Ray cluster (``auto``: the running one; ``local``: a new one on this machine, kept on
    loopback; else ``HOST:PORT``). Returns True when this call started the connection (and must end it)."""
    ray = import_ray()
    if ray.is_initialized():  # an application (or a test) that connected already
        return False
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    if address == "local":
        keep_on_loopback()
        kwargs.update(address="local", num_cpus=num_cpus)
    else:
        _probe(address)
        kwargs["address"] = address
        if _loopback(address):  # a cluster on this machine's loopback: the driver joins it there too
            kwargs["_node_ip_address"] = "127.0.0.1"
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputError(
            f"cannot connect to the Ray cluster at {address!r} ({_one_line(exc)[:200]}); start one with "
            "'ray start --head', or use --ray local"
        ) from exc
    return True


def run_cluster(
    items: list[tuple[Path, str | None]],
    job: VolumeJob,
    actors: int | None = None,
    echo=None,
) -> list[dict]:
    """Segment every (path, case id) on the connected Ray cluster; one row per input, in input order.

    A volume whose actor is lost more often than the retry bound allows, or that the job never reached
    because Ray stopped, gets a failed row too: the outputs on disk stay complete or absent either way."""
    ray = import_ray()
    from ray.data import ActorPoolStrategy

    names = output_names(items)
    rows_in = [{"path": str(p), "case_id": names[p]} for p in names]
    resources = actor_resources(job.model, job.backend, job.provider, job.cpus)
    if actors is None:
        have = ray.cluster_resources()
        fit = have.get("GPU", 0) if resources["num_gpus"] else have.get("CPU", 1) / resources["num_cpus"]
        actors = max(1, int(fit))
    actors = max(1, min(actors, len(rows_in)))
    with warnings.catch_warnings():
        # Ray Data has no named parameter for the retry bound yet (its default is unbounded)
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        ds = ray.data.from_items(rows_in, override_num_blocks=len(rows_in)).map_batches(
            SegmentVolumes,
            fn_constructor_kwargs={"job": job},
            batch_size=1,
            # one volume per actor at a time: a queued volume would wait behind a long one while others idle
            compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
            max_restarts=RETRIES,
            max_task_retries=RETRIES,
            **resources,
        )
    done: dict[str, dict] = {}
    stopped = ""
    try:
        for row in ds.iter_rows():
            row = {k: _plain(row.get(k)) for k in COLUMNS}
            done[row["input"]] = row
            if echo is not None:
                echo(_row_line(row))
    except Exception as exc:  # Ray gave up (retries exhausted, cluster lost): the rest become failed rows
        stopped = _one_line(f"{type(exc).__name__}: {exc}")[:300]
    out = []
    for r in rows_in:
        row = done.get(r["path"])
        if row is None:
            row = dict.fromkeys(COLUMNS, None)
            row.update(
                case_id=r["case_id"],
                input=r["path"],
                status="failed",
                error=f"{r['path']}: not finished: the Ray job stopped ({stopped or 'no result'}); rerun to resume",
                mask="",
                report="",
            )
        out.append(row)
    return out


def _plain(v):
    """Arrow/numpy scalars as plain Python values (for JSON and the table)."""
    if hasattr(v, "item"):
        return v.item()
    return v


def _row_line(row: dict) -> str:
    if row["status"] == "failed":
        return f"error: {row['error']}"
    if row["status"] == "skipped":
        return f"{row['input']}: done already, skipped"
    return (
        f"{row['input']}: liver {row['liver_ml']:.0f} mL, tumour {row['tumor_ml']:.1f} mL; {row['slices']} slices "
        f"in {row['seconds']:.1f}s on {row['node_ip']} -> {row['mask']}"
    )


def write_results(rows: list[dict], path: Path) -> Path:
    """The result rows as Parquet (``.parquet``) or JSON lines (anything else), written atomically."""
    from .io import json_text, write_bytes_atomic

    if path.suffix.lower() in (".parquet", ".pq"):
        import io

        pa = require("pyarrow", RAY_EXTRA, "a Parquet result file", hint='pip install "unet-edge[ray]"')
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in COLUMNS} for r in rows]), buf)
        return write_bytes_atomic(path, buf.getvalue())
    text = "".join(json_text({k: r.get(k) for k in COLUMNS}) + "\n" for r in rows)  # strict JSON lines
    return write_bytes_atomic(path, text.encode())


def summary(rows: list[dict]) -> str:
    """The one-line summary: counts per status."""
    n = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    line = f"{n['ok']} segmented, {n['skipped']} skipped, {n['failed']} failed of {len(rows)} volume(s)"
    nodes = {r["node_id"] for r in rows if r.get("node_id")}
    return line + f" on {len(nodes)} node(s)" if nodes else line


def table(rows: list[dict]) -> str:
    """A fixed-width table of the rows: case, status, volumes, time, node."""
    head = ("case", "status", "liver mL", "tumour mL", "s", "node")
    body = [
        (
            str(r["case_id"]),
            r["status"],
            "" if r.get("liver_ml") is None else f"{r['liver_ml']:.0f}",
            "" if r.get("tumor_ml") is None else f"{r['tumor_ml']:.1f}",
            "" if r.get("seconds") is None else f"{r['seconds']:.1f}",
            f"{r['node_ip']} {str(r['node_id'])[:8]}" if r.get("node_id") else "",
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body))


def check_model(model: Path, backend: str, provider: str) -> None:
    """Refuse a missing or unusable model here, in one line, rather than in every actor. A CPU ONNX model
    is opened once on this machine; a GPU model is left to the nodes that have the GPU."""
    from .models import open_backend

    if not Path(model).is_file():
        raise InputError(f"{model}: no such model file")
    if actor_resources(model, backend, provider, 1)["num_gpus"]:
        return
    with open_backend(model, backend, provider, threads=1, streams=1):
        pass


def run_cluster_cli(
    paths: list[Path],
    names: dict[Path, str] | None,
    model: Path,
    out_dir: Path,
    address: str,
    results: Path | None = None,
    actors: int | None = None,
    cpus_per_actor: int = 1,
    **options,
) -> int:
    """seg-run --ray: connect, segment, write the result rows, print the table and the summary; the exit code."""
    import click

    from .cliutil import EXIT_FAILED

    check_model(model, options.get("backend", "auto"), options.get("provider", "auto"))
    items = [(p.absolute(), (names or {}).get(p)) for p in paths]
    job = VolumeJob(model=str(Path(model).absolute()), out_dir=str(out_dir.absolute()), cpus=cpus_per_actor, **options)
    results = results or out_dir / "seg-run-results.jsonl"
    output_names(items)  # refuse clashing outputs before starting anything
    started = connect(address, num_cpus=None)
    try:
        click.echo(f"ray: {_cluster_line()}", err=True)
        t0 = time.perf_counter()
        rows = run_cluster(items, job, actors=actors, echo=lambda line: click.echo(line, err=line.startswith("error")))
        wall = time.perf_counter() - t0
    finally:
        if started:
            import_ray().shutdown()
    write_results(rows, results)
    click.echo(table(rows))
    click.echo(f"{summary(rows)} in {wall:.1f}s; results: {results}")
    failed = sum(r["status"] == "failed" for r in rows)
    if failed:
        click.echo(f"{failed} of {len(rows)} volume(s) failed", err=True)
        return EXIT_FAILED
    return 0


def _cluster_line() -> str:
    ray = import_ray()
    res = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return f"{len(nodes)} node(s), {res.get('CPU', 0):.0f} CPU(s), {res.get('GPU', 0):.0f} GPU(s)"
