"""seg-run's outputs: unique names, own outputs never inputs, verified skips, disk full, stale temp
files, and report writers that never replace a good report with a failed run's."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from benchmarks.tiny_models import threshold_model
from runtime.cli import cli
from runtime.errors import InputError
from runtime.outputs import check_names, output_names, remove_stale_temps, temp_prefix, write_group_atomic
from tests.conftest import run_main, save_nifti
from tests.test_seg_run import write_case


@pytest.fixture
def model(tmp_path):
    return threshold_model(tmp_path / "m.onnx")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def ours(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".unet-edge-"))


def seg(*args, capsys) -> tuple[int, str]:
    return run_main(cli, list(args), capsys)


# 1: unique names ---------------------------------------------------------------------------------
def test_same_file_name_in_several_folders_gets_one_output_each(tmp_path, model, capsys):
    for k, pat in enumerate("abc"):
        (tmp_path / "pats" / pat).mkdir(parents=True)
        write_case(tmp_path / "pats" / pat / "ct.nii.gz", index=k, seed=10 + k)
    code, out = seg(str(tmp_path / "pats" / "*" / "ct.nii.gz"), "--model", model, "-o", tmp_path / "out", capsys=capsys)
    assert code == 0, out
    for pat in "abc":
        mask = nib.load(str(tmp_path / "out" / f"{pat}_ct_seg.nii.gz"))
        rec = json.loads((tmp_path / "out" / f"{pat}_ct.json").read_text())
        assert rec["input"] == str(tmp_path / "pats" / pat / "ct.nii.gz")
        assert rec["mask_sha256"] == sha(tmp_path / "out" / f"{pat}_ct_seg.nii.gz")
        # each mask follows its own patient's intensities
        hu = np.asanyarray(nib.load(rec["input"]).dataobj)
        assert ((np.asanyarray(mask.dataobj) >= 1) == (hu > -200 + 0.55 * 450))[hu > -500].mean() > 0.9
    assert len({sha(tmp_path / "out" / f"{p}_ct_seg.nii.gz") for p in "abc"}) == 3


def test_scan_nii_beside_scan_nii_gz_keeps_both(tmp_path, model, capsys):
    (tmp_path / "in").mkdir()
    write_case(tmp_path / "in" / "scan.nii.gz", index=0)
    write_case(tmp_path / "in" / "scan.nii", index=1, seed=9)
    code, out = seg(tmp_path / "in", "--model", model, "-o", tmp_path / "out", capsys=capsys)
    assert code == 0, out
    a = json.loads((tmp_path / "out" / "scan_nii_gz.json").read_text())
    b = json.loads((tmp_path / "out" / "scan_nii.json").read_text())
    assert a["input"].endswith("scan.nii.gz") and b["input"].endswith("scan.nii")
    assert a["mask_sha256"] != b["mask_sha256"]
    assert not (tmp_path / "out" / "scan_seg.nii.gz").exists()


def test_output_names_are_plain_when_unique_and_deterministic():
    paths = [Path("d/volume-1.nii.gz"), Path("d/volume-2.nii"), Path("e/x/ct.nii.gz"), Path("e/y/CT.nii.gz")]
    names = output_names(paths)
    assert names == {paths[0]: "volume-1", paths[1]: "volume-2", paths[2]: "x_ct", paths[3]: "y_CT"}
    assert output_names(list(reversed(paths))) == names


def test_colliding_or_bad_names_are_refused_up_front(tmp_path, model):
    from runtime.backends.onnxrt import OnnxRuntimeBackend
    from runtime.cli import segment_files

    a, b = write_case(tmp_path / "a.nii.gz"), write_case(tmp_path / "b.nii.gz", index=1)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=r"2 inputs would write the same outputs \('case'.*a.nii.gz, .*b.nii.gz"):
        check_names({a: "case", b: "Case"})  # case-insensitive file systems would clash too
    for bad in ("", "../up", ".hidden", "a/b"):
        with pytest.raises(InputError, match="not a plain file name"):
            check_names({a: bad})
    with OnnxRuntimeBackend(model) as be:
        with pytest.raises(InputError, match="same outputs"):
            segment_files([a, b], be, out, 2, names={a: "p1", b: "p1"})
        assert list(out.iterdir()) == []
        res = segment_files([a, b], be, out, 2, names={a: "p1", b: "p2"}, echo=lambda *a, **k: None)
    assert all(isinstance(r, dict) for r in res.values())
    assert json.loads((out / "p2.json").read_text())["input"] == str(b)


# 3: our outputs are never inputs -----------------------------------------------------------------
def test_same_folder_in_and_out_twice_never_segments_its_own_outputs(tmp_path, model, capsys):
    d = tmp_path / "same"
    d.mkdir()
    write_case(d / "volume-0.nii.gz")
    args = (d, "--model", model, "-o", d, "--probabilities", "--overlay")
    code, out = seg(*args, capsys=capsys)
    assert code == 0, out
    first = snapshot(d)
    code, out = seg(*args, capsys=capsys)
    assert code == 0, out
    assert out.count("left out 2 mask(s) or probability map(s) seg-run wrote") == 1
    assert sorted(p.name for p in d.iterdir()) == sorted(first)  # no volume-0_seg_seg.nii.gz
    assert "volume-0_seg" not in out.replace("volume-0_seg.nii.gz", "")
    # given only our own outputs: one line, nothing written
    code, out = seg(d / "volume-0_seg.nii.gz", "--model", model, "-o", d, capsys=capsys)
    assert code == 2 and "seg-run's own output, never an input" in out and len(out.strip().splitlines()) == 1
    assert sorted(p.name for p in d.iterdir()) == sorted(first)


def test_outputs_of_an_older_version_are_recognised_by_their_json(tmp_path, model, capsys):
    d = tmp_path / "same"
    d.mkdir()
    write_case(d / "volume-0.nii.gz")
    mask = np.zeros((64, 64, 16), np.uint8)
    save_nifti(d / "volume-1_seg.nii.gz", mask, np.eye(4))  # no stamp in its header
    (d / "volume-1.json").write_text(json.dumps({"input": "volume-1.nii.gz", "mask": str(d / "volume-1_seg.nii.gz")}))
    save_nifti(d / "user_seg.nii.gz", mask, np.eye(4))  # a user's file that merely ends in _seg: still an input
    code, out = seg(d, "--model", model, "-o", tmp_path / "out", "--no-postprocess", capsys=capsys)
    assert "left out 1 mask(s)" in out
    assert (tmp_path / "out" / "volume-0.json").exists() and not (tmp_path / "out" / "volume-1_seg_seg.nii.gz").exists()
    assert "user_seg.nii.gz" in out  # segmented (or refused on its own merits), not left out


# 5: --skip-existing skips only verified masks ----------------------------------------------------
def test_skip_existing_redoes_a_truncated_foreign_or_stale_mask(tmp_path, model, capsys):
    a = write_case(tmp_path / "a.nii.gz")
    out = tmp_path / "out"
    code, log = seg(a, "--model", model, "-o", out, capsys=capsys)
    assert code == 0, log
    good = snapshot(out)
    rec = json.loads((out / "a.json").read_text())
    assert rec["input_sha256"] == sha(a) and rec["model_sha256"] == sha(model)
    assert rec["mask_sha256"] == sha(out / "a_seg.nii.gz")

    code, log = seg(a, "--model", model, "-o", out, "--skip-existing", capsys=capsys)
    assert code == 0 and "done already, skipped" in log and snapshot(out) == good

    mask = out / "a_seg.nii.gz"
    mask.write_bytes(good["a_seg.nii.gz"][: len(good["a_seg.nii.gz"]) // 2])  # truncated
    code, log = seg(a, "--model", model, "-o", out, "--skip-existing", capsys=capsys)
    assert code == 0 and "not skipped: a_seg.nii.gz does not match the sha256 its JSON records" in log
    assert mask.read_bytes() == good["a_seg.nii.gz"]  # redone, byte for byte what it was
    assert json.loads((out / "a.json").read_text())["mask_sha256"] == sha(mask)

    other = threshold_model(tmp_path / "other.onnx", level=0.6)
    code, log = seg(a, "--model", other, "-o", out, "--skip-existing", capsys=capsys)
    assert code == 0 and "not skipped: it was made with another model" in log
    assert json.loads((out / "a.json").read_text())["model_sha256"] == sha(other)

    write_case(a, index=1, seed=77)  # the input itself changed
    code, log = seg(a, "--model", other, "-o", out, "--skip-existing", capsys=capsys)
    assert code == 0 and "not skipped: the input has changed since" in log
    assert json.loads((out / "a.json").read_text())["input_sha256"] == sha(a)

    code, log = seg(a, "--model", other, "-o", out, "--skip-existing", "--min-tumour-ml", "1", capsys=capsys)
    assert code == 0 and "not skipped: it was made with other options (min_tumour_ml)" in log


def test_a_mask_without_its_json_is_not_done(tmp_path, model, capsys):
    a = write_case(tmp_path / "a.nii.gz")
    out = tmp_path / "out"
    assert seg(a, "--model", model, "-o", out, capsys=capsys)[0] == 0
    good = snapshot(out)
    (out / "a.json").unlink()  # what a kill between the two renames leaves
    code, log = seg(a, "--model", model, "-o", out, "--skip-existing", capsys=capsys)
    assert code == 0 and "not skipped: no a.json records a finished mask" in log
    assert (out / "a_seg.nii.gz").read_bytes() == good["a_seg.nii.gz"] and (out / "a.json").exists()
    (out / "a.json").write_text(json.dumps({"input": str(a), "mask": str(out / "a_seg.nii.gz")}))
    code, log = seg(a, "--model", model, "-o", out, "--skip-existing", capsys=capsys)
    assert code == 0 and "records no checksums" in log
    assert json.loads((out / "a.json").read_text())["mask_sha256"] == sha(out / "a_seg.nii.gz")


# 7: disk full ------------------------------------------------------------------------------------
def test_disk_full_in_process_keeps_pairs_whole_and_the_batch_going(tmp_path, model, capsys, monkeypatch):
    d = tmp_path / "in"
    d.mkdir()
    for k in range(3):
        write_case(d / f"c{k}.nii.gz", index=k)
    real_fdopen = os.fdopen
    writes = {"n": 0}

    class FillsUp:
        """A temp file on a disk that fills up during the 5th output file (c1's JSON)."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            writes["n"] += 1
            if writes["n"] == 5:
                self.f.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: FillsUp(real_fdopen(*a, **k)))
    out = tmp_path / "out"
    code, log = seg(d, "--model", model, "-o", out, "--overlay", capsys=capsys)
    assert code == 1
    lines = [ln for ln in log.splitlines() if "c1" in ln or "failed" in ln]
    assert lines == [
        f"error: {d / 'c1.nii.gz'}: not written: the disk is full at {out} (No space left on device); "
        "free some space there or choose another -o",
        "1 of 3 volume(s) failed",
    ]
    assert "Traceback" not in log
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"c{k}{s}" for k in (0, 2) for s in ("_seg.nii.gz", ".json", "_overlay.png"))
    for k in (0, 2):
        assert json.loads((out / f"c{k}.json").read_text())["mask_sha256"] == sha(out / f"c{k}_seg.nii.gz")


@pytest.fixture
def small_fs(tmp_path):
    """A real 1 MiB tmpfs (needs root and mount rights; skipped where they are missing)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, timeout=20)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=20)


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


def test_disk_full_on_a_real_small_file_system(tmp_path, small_fs, model, capsys):
    d = tmp_path / "in"
    d.mkdir()
    for k in range(2):
        write_case(d / f"c{k}.nii.gz", index=k)
    out = small_fs / "out"
    code, log = seg(d / "c0.nii.gz", "--model", model, "-o", out, capsys=capsys)
    assert code == 0, log
    good = snapshot(out)
    filler = fill(small_fs)
    code, log = seg(d, "--model", model, "-o", out, capsys=capsys)
    assert code == 1 and "Traceback" not in log
    assert f"c1.nii.gz: not written: the disk is full at {out}" in log and "2 of 2 volume(s) failed" in log
    assert snapshot(out) == good  # the earlier pair untouched, nothing of c1, no temp file
    filler.unlink()
    code, log = seg(d, "--model", model, "-o", out, "--skip-existing", capsys=capsys)
    assert code == 0 and "c0.nii.gz: done already" in log
    rec = json.loads((out / "c1.json").read_text())
    assert rec["mask_sha256"] == sha(out / "c1_seg.nii.gz") and ours(out) == []


def test_write_group_is_all_or_nothing(tmp_path, monkeypatch):
    (tmp_path / "a").write_bytes(b"old a")
    (tmp_path / "b").write_bytes(b"old b")
    real_replace = os.replace

    def second_rename_fails(src, dst):
        if str(dst).endswith("/b"):
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="I/O error"):
        write_group_atomic([(tmp_path / "a", b"new a"), (tmp_path / "b", b"new b")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # a new a without its b is removed
    monkeypatch.setattr(os, "replace", real_replace)
    write_group_atomic([(tmp_path / "a", b"new a"), (tmp_path / "b", b"new b")])
    assert (tmp_path / "a").read_bytes() == b"new a" and (tmp_path / "b").read_bytes() == b"new b"


# 8: stale temp files ----------------------------------------------------------------------------
def test_stale_temp_files_of_ours_are_removed_and_only_ours(tmp_path, model, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prefix = temp_prefix()
    host = prefix[len(".unet-edge-") :].rsplit("-", 2)[0]
    stale = out / f".unet-edge-{host}-{dead.pid}-abc123.part"
    live = out / f"{prefix}def456.part"  # this very process: alive
    elsewhere = out / ".unet-edge-otherhost-1-x.part"  # another machine's, on a shared folder
    foreign = [out / ".a_seg.nii.gz.xyz.part", out / "notes.part", out / ".unet-edge-notes.txt"]
    for p in [stale, live, elsewhere, *foreign]:
        p.write_bytes(b"partial")
    assert remove_stale_temps(out) == [stale]
    stale.write_bytes(b"partial")
    a = write_case(tmp_path / "a.nii.gz")
    code, log = seg(a, "--model", model, "-o", out, capsys=capsys)
    assert code == 0 and "removed 1 temporary file(s) an interrupted run left" in log
    assert not stale.exists() and all(p.exists() for p in [live, elsewhere, *foreign])


# 11: reports --------------------------------------------------------------------------------------
def test_a_failing_score_never_replaces_a_good_report(tmp_path, capsys):
    from benchmarks.cli import cli as bench

    preds, labels, rep = tmp_path / "preds", tmp_path / "labels", tmp_path / "rep"
    preds.mkdir()
    labels.mkdir()
    ref = np.zeros((6, 6, 6), np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    save_nifti(labels / "segmentation-3.nii.gz", ref, np.eye(4))
    save_nifti(labels / "volume-3.nii.gz", ref.astype(np.int16), np.eye(4))
    save_nifti(preds / "volume-3_seg.nii.gz", ref, np.eye(4))
    code, out = run_main(bench, ["score", preds, labels, "-o", rep], capsys, "seg-bench")
    assert code == 0, out
    good = snapshot(rep)
    assert json.loads(good["score.json"])["per_case"]["volume-3"]["liver"]["dice"] == 1.0
    empty = tmp_path / "empty"
    empty.mkdir()
    save_nifti(empty / "volume-8_seg.nii.gz", ref, np.eye(4))  # matches no label
    code, out = run_main(bench, ["score", empty, labels, "-o", rep], capsys, "seg-bench")
    assert code == 1 and "no case scored: no report written" in out
    assert snapshot(rep) == good
    save_nifti(empty / "volume-3_seg.nii.gz", ref, np.eye(4))  # one matches, one does not
    code, out = run_main(bench, ["score", empty, labels, "-o", rep], capsys, "seg-bench")
    assert code == 1 and "score.json left as it was" in out
    assert (rep / "score.json").read_bytes() == good["score.json"]
    assert json.loads((rep / "score.failed.json").read_text())["failed"] == "1 file(s) not scored"


def test_reports_are_strict_json(tmp_path):
    from benchmarks.report import write_reports

    write_reports(tmp_path, "x", {"a": float("nan"), "b": np.float32(1.5), "c": [np.int64(2), float("inf")]}, "", [])
    assert json.loads((tmp_path / "x.json").read_text(), parse_constant=lambda c: 1 / 0) == {
        "a": None,
        "b": 1.5,
        "c": [2, None],
    }


def test_the_kill_benchmark_runs_and_finds_no_violation(tmp_path):
    """Real SIGKILLs of a real seg-run, one of them during its writes (the benchmark does 50)."""
    pytest.importorskip("onnx")
    from benchmarks.kill_test import markdown, run_trials

    res = run_trials(kills=2, slices=12, size=48, seed=1, work=tmp_path, echo=lambda *a, **k: None)
    assert res["complete"] + res["absent"] + res["mask_only"] == 2 and res["violation"] == 0
    assert res["next_runs_not_ok"] == 0 and res["temp_files_after_next_runs"] == 0
    assert "| violations |" in markdown(res)
