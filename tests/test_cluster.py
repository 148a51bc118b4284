"""seg-run --ray on a real local Ray cluster (kept on loopback): results, resume, a killed actor, two nodes."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from benchmarks.tiny_models import threshold_model
from runtime.cli import cli
from runtime.io import write_nifti
from runtime.phantoms import make_phantom, phantom_images

GOOD, BAD = 9, 3


def stop_processes_under(marker: str) -> None:
    """SIGTERM, then SIGKILL, the processes whose command line names ``marker`` (a fixture's own temp dir)."""
    import psutil

    procs = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local cluster for the module: 2 CPUs, no dashboard, nodes on 127.0.0.1, HOME and temp dir in tmp."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")

    from runtime.cluster import keep_on_loopback

    root = tmp_path_factory.mktemp("rc")
    mp = pytest.MonkeyPatch()
    mp.setenv("HOME", str(root))  # Ray's auth token goes under $HOME/.ray
    keep_on_loopback()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=str(root / "r"), configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        stop_processes_under(str(root / "r"))
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        mp.undo()


def write_case(path: Path, index: int, size: int = 64, slices: int = 16) -> Path:
    img, _ = phantom_images(make_phantom(5, index, size=size, slices=slices))
    return write_nifti(img, path)


def write_cohort(root: Path, size: int = 64, slices: int = 16) -> tuple[Path, Path]:
    """9 phantoms and 3 corrupt files, and a CSV manifest naming each row's case."""
    vols = root / "in"
    vols.mkdir(parents=True)
    rows = []
    for i in range(GOOD):
        rows.append((write_case(vols / f"scan{i}.nii.gz", i, size, slices), f"case-{i:02d}"))
    truncated = vols / "truncated.nii.gz"
    truncated.write_bytes((vols / "scan0.nii.gz").read_bytes()[:3000])
    text = vols / "notes.nii.gz"
    text.write_bytes(gzip.compress(b"this is not an image\n"))
    flat = vols / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.int16), np.eye(4)), str(flat))
    rows += [(truncated, "bad-truncated"), (text, "bad-text"), (flat, "bad-2d")]
    manifest = root / "cohort.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "case_id"])
        for p, case in rows:
            w.writerow([p.relative_to(root), case])  # relative to the manifest's directory
    return vols, manifest


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The cohort, the model, and the masks plain single-process seg-run writes for it."""
    root = tmp_path_factory.mktemp("cohort")
    vols, manifest = write_cohort(root)
    model = threshold_model(root / "m.onnx")
    ref = root / "ref"
    code, out = _run(["--manifest", manifest, "-m", model, "-o", ref])
    assert code == 1 and len(list(ref.glob("*_seg.nii.gz"))) == GOOD, out
    return {"root": root, "manifest": manifest, "model": model, "ref": ref}


def _run(args) -> tuple[int, str]:
    """seg-run through its real entry point, capturing what it prints."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from runtime.cliutil import run_cli

    buf = io.StringIO()
    with redirect_stdout(buf), redirect_stderr(buf):
        try:
            run_cli(cli, "seg-run", [str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, buf.getvalue()


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(str(path)).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_cohort_result(rows: list[dict], out: Path, ref: Path, ok_status: str = "ok") -> None:
    assert len(rows) == GOOD + BAD
    by_case = {r["case_id"]: r for r in rows}
    for i in range(GOOD):
        r = by_case[f"case-{i:02d}"]
        assert r["status"] == ok_status, r
        assert r["error"] == "" and r["liver_ml"] > 100 and r["node_ip"] == "127.0.0.1"
        mask = out / f"case-{i:02d}_seg.nii.gz"
        assert r["mask"] == str(mask)
        assert mask.read_bytes() == (ref / mask.name).read_bytes()  # byte-identical to single-process seg-run
        assert json.loads((out / f"case-{i:02d}.json").read_text())["liver_ml"] == pytest.approx(r["liver_ml"])
    for case, reason in (("bad-truncated", "truncated.nii.gz"), ("bad-text", "notes.nii.gz"), ("bad-2d", "flat")):
        r = by_case[case]
        assert r["status"] == "failed" and reason in r["error"] and "\n" not in r["error"], r
        assert r["mask"] == "" and not (out / f"{case}_seg.nii.gz").exists()
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == sorted(f"case-{i:02d}_seg.nii.gz" for i in range(GOOD))
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a temporary or partial file is left"


def test_cohort_failures_are_rows_and_rerun_skips(cluster, cohort, tmp_path):
    out = tmp_path / "out"
    args = ["--manifest", cohort["manifest"], "-m", cohort["model"], "-o", out, "--ray", "auto", "--skip-existing"]
    code, text = _run([*args, "--results", tmp_path / "rows.parquet"])
    assert code == 1, text
    assert f"{GOOD} segmented, 0 skipped, {BAD} failed of {GOOD + BAD} volume(s) on 1 node(s)" in text
    assert f"{BAD} of {GOOD + BAD} volume(s) failed" in text
    rows = read_rows(tmp_path / "rows.parquet")
    assert_cohort_result(rows, out, cohort["ref"])
    assert all(r["backend"].startswith("onnxruntime (cpu)") for r in rows)
    assert {r["case_id"] for r in rows} <= set(text.split()), "the final table names every case"
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*_seg.nii.gz")}

    code, text = _run(args)  # the same command again: nothing left to do but the bad files
    assert code == 1, text
    assert f"0 segmented, {GOOD} skipped, {BAD} failed" in text
    rows = read_rows(out / "seg-run-results.jsonl")
    assert_cohort_result(rows, out, cohort["ref"], ok_status="skipped")
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_seg.nii.gz")} == stamps


def test_dicom_series_on_the_cluster_get_the_same_mask_and_a_seg(cluster, cohort, tmp_path):
    """--dicom-seg and the DICOM reader reach the actors: a series segmented on the cluster gives
    the mask plain seg-run gives, and its DICOM SEG."""
    pytest.importorskip("highdicom")
    from runtime.dicom_write import write_ct_series

    img = nib.load(write_case(tmp_path / "v.nii.gz", 0))
    write_ct_series(np.asarray(img.dataobj, dtype=np.float32), img.affine, tmp_path / "study" / "series")
    args = [tmp_path / "study", "-m", cohort["model"], "--dicom-seg"]
    code, text = _run([*args, "-o", tmp_path / "plain"])
    assert code == 0, text
    code, text = _run([*args, "-o", tmp_path / "ray", "--ray", "auto"])
    assert code == 0, text
    (plain,) = (tmp_path / "plain").glob("*_seg.nii.gz")
    assert (tmp_path / "ray" / plain.name).read_bytes() == plain.read_bytes()
    assert (tmp_path / "ray" / plain.name.replace(".nii.gz", ".dcm")).stat().st_size > 0


def _actor_pids() -> list[int]:
    import psutil

    me = psutil.Process()
    return [p.pid for p in me.children(recursive=True) if "SegmentVolumes" in " ".join(_cmdline(p))]


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:
        return []


def _reading(pid: int, folder: Path) -> bool:
    """Whether the process has a file under ``folder`` open: a volume in flight."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(folder)):
                return True
        except OSError:
            continue
    return False


@pytest.mark.slow
def test_actor_killed_mid_volume_is_retried(cluster, tmp_path):
    """SIGKILL an actor while it reads a volume: Ray restarts it and retries the volume; the job still ends
    with 9 masks identical to single-process seg-run, 3 failure rows, and no partial file."""
    vols, manifest = write_cohort(tmp_path, size=128, slices=32)  # volumes that take a while each
    model = threshold_model(tmp_path / "m.onnx")
    ref = tmp_path / "ref"
    assert _run(["--manifest", manifest, "-m", model, "-o", ref])[0] == 1
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_one_in_flight():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for pid in _actor_pids():
                if _reading(pid, vols):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.002)

    killer = threading.Thread(target=kill_one_in_flight)
    killer.start()
    code, text = _run(["--manifest", manifest, "-m", model, "-o", out, "--ray", "auto"])
    killer.join()
    assert killed, "no actor was caught reading a volume"
    assert code == 1, text
    rows = read_rows(out / "seg-run-results.jsonl")
    assert_cohort_result(rows, out, ref)
    assert killed[0] not in {r["pid"] for r in rows}, "a row came from the killed process"


def test_without_a_cluster_address_gives_one_line(tmp_path):
    """A cluster address that does not answer: one line, exit 2, nothing written."""
    pytest.importorskip("ray.data")
    write_case(tmp_path / "a.nii.gz", 0)
    model = threshold_model(tmp_path / "m.onnx")
    env = {**os.environ, "HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.cli", str(tmp_path / "a.nii.gz"), "-m", str(model), "-o", str(tmp_path / "o")]
        + ["--ray", "127.0.0.1:9"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("seg-run: error: cannot connect to the Ray cluster") and "Traceback" not in proc.stderr
    assert not list((tmp_path / "o").glob("*.nii.gz"))


def test_manifest_errors_are_one_line(tmp_path):
    from runtime.cluster import output_names, read_manifest
    from runtime.errors import InputError

    bad = tmp_path / "m.csv"
    bad.write_text("file,case_id\na.nii.gz,x\n")
    with pytest.raises(InputError, match="no 'path' column"):
        read_manifest(bad)
    bad.write_text("path,case_id\na.nii.gz,../x\n")
    with pytest.raises(InputError, match="not a file name"):
        read_manifest(bad)
    # the names plain seg-run derives: one file name in two folders is named by its folder
    a, b = tmp_path / "a" / "x.nii.gz", tmp_path / "b" / "x.nii.gz"
    assert output_names([(a, None), (b, None)]) == {a: "a_x", b: "b_x"}
    with pytest.raises(InputError, match="would write the same outputs"):
        output_names([(a, "case1"), (b, "case1")])
    good = tmp_path / "g.csv"
    good.write_text("path,case_id\nsub/a.nii.gz,\n/abs/b.nii.gz,bee\n")
    assert read_manifest(good) == [(tmp_path / "sub" / "a.nii.gz", None), (Path("/abs/b.nii.gz"), "bee")]


def _netns_available() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=30)
    return probe.returncode == 0


def test_without_the_extra_ray_mode_names_it(tmp_path):
    """With Ray not importable, --ray stops with one line naming the extra, and writes nothing."""
    write_case(tmp_path / "a.nii.gz", 0)
    model = threshold_model(tmp_path / "m.onnx")
    code = (
        "import sys; sys.modules['ray'] = None; sys.argv = ['seg-run'] + sys.argv[1:]; "
        "from runtime.cli import main; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "a.nii.gz"), "-m", str(model), "-o", str(tmp_path / "o")]
        + ["--ray", "local"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "seg-run: error: seg-run --ray needs the 'ray' package: pip install \"unet-edge[ray]\""
    )
    assert not list((tmp_path / "o").glob("*.nii.gz"))


@pytest.mark.slow
def test_two_nodes_share_the_job(tmp_path, tmp_path_factory):
    """A head and a worker started with `ray start` (1 CPU each) in a network namespace with loopback only:
    rows name two node ids, and every node address is loopback."""
    pytest.importorskip("ray.data")
    if not _netns_available():
        pytest.skip("needs `unshare -n` (root) to keep a two-node cluster on loopback")
    vols, manifest = write_cohort(tmp_path)
    model = threshold_model(tmp_path / "m.onnx")
    ref = tmp_path / "ref"
    assert _run(["--manifest", manifest, "-m", model, "-o", ref])[0] == 1
    out, temp = tmp_path / "out", tmp_path_factory.mktemp("n") / "r"  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), RAY_AUTH_MODE="disabled", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    # the job starts once both actors are up, so the worker node gets volumes even though these are quick
    env["RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S"] = "120"
    cmd = [sys.executable, "-m", "tests.ray_nodes", str(temp), "--", "--manifest", str(manifest)]
    cmd += ["-m", str(model), "-o", str(out), "--ray", "127.0.0.1:6390", "--results", str(tmp_path / "rows.jsonl")]
    try:
        proc = subprocess.run(
            ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    finally:
        stop_processes_under(str(temp))
    assert proc.returncode == 1 and (tmp_path / "rows.jsonl").exists(), (proc.stdout + proc.stderr)[-3000:]
    rows = read_rows(tmp_path / "rows.jsonl")
    assert_cohort_result(rows, out, ref)
    nodes = {r["node_id"] for r in rows if r["status"] == "ok"}
    assert len(nodes) == 2, rows
    assert {r["node_ip"] for r in rows} == {"127.0.0.1"}
    assert "on 2 node(s)" in proc.stdout
