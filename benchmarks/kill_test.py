"""Kill seg-run with SIGKILL at random moments and check that nothing half-written survives.

Each trial starts ``seg-run`` on one phantom volume (with probabilities and an overlay, so a
volume's outputs are four files) into a fresh folder, kills it after a random delay (half of
the kills fall anywhere in the run; the other half wait for the run's first output bytes and
then fall within the time the uninterrupted run spends writing) and looks at what is left:

- complete: the JSON loads and records the sha256 of the mask and probability map beside it,
  and those are byte for byte the uninterrupted run's;
- absent: no mask and no JSON;
- mask only: a mask but no JSON (a kill between the renames); it is not "done" (no JSON records
  it), and the next run redoes it;
- violation: anything else (a JSON that does not verify, a file that is not the uninterrupted
  run's byte for byte).

Then the next run (``--skip-existing``) goes to the same folder: it must end with the
complete pair (skipping it when it was complete already) and no temp file of ours.

Usage: ``python -m benchmarks.kill_test --kills 50 -o reports/kill``. Needs the export extra
(onnx) to build its small model.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

TEMP_MARK = ".unet-edge-"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_model(path: Path, size: int = 128, spacing_mm: float = 3.0) -> Path:
    """A 1x1-convolution ONNX model (liver where the windowed HU is high) carrying a spec: it
    runs in milliseconds, so a trial's time is seg-run's own reading, postprocessing and writing."""
    from .tiny_models import threshold_model, threshold_spec

    return threshold_model(path, threshold_spec(size, spacing_mm))


def classify(out: Path, name: str, want: dict[str, str]) -> str:
    """complete, absent, mask only, or violation (see the module docstring)."""
    mask, js = out / f"{name}_seg.nii.gz", out / f"{name}.json"
    if not js.exists():
        if not mask.exists():
            return "absent"
        return "mask only" if _sha(mask) == want["mask"] else "violation"
    try:
        rec = json.loads(js.read_text())
        ok = (
            mask.exists()
            and rec["mask_sha256"] == _sha(mask) == want["mask"]
            and rec["probabilities_sha256"] == _sha(out / f"{name}_prob.nii.gz") == want["prob"]
        )
    except (OSError, ValueError, KeyError):
        ok = False
    return "complete" if ok else "violation"


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:  # renamed or removed meanwhile
        return 0


def _writing(folder: Path) -> bool:
    """A temp file of ours with bytes in it (the output-folder probe at start-up is empty)."""
    return any(_size(p) > 0 for p in folder.iterdir() if p.name.startswith(TEMP_MARK))


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TEMP_MARK))


def run_trials(kills: int, slices: int, size: int, seed: int, work: Path, echo=click.echo) -> dict:
    from runtime.io import write_nifti
    from runtime.phantoms import make_phantom, phantom_images

    ct = work / "ct.nii.gz"
    img, _ = phantom_images(make_phantom(seed=seed, index=0, size=size, slices=slices))
    write_nifti(img, ct)
    model = small_model(work / "small.onnx")
    cmd = [sys.executable, "-m", "runtime.cli", str(ct), "--model", str(model), "--probabilities", "--overlay"]

    # the uninterrupted run, watched to find when it writes
    ref = work / "ref"
    ref.mkdir()
    began = time.perf_counter()
    proc = subprocess.Popen([*cmd, "-o", str(ref)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_temp = json_at = None
    while proc.poll() is None:
        if first_temp is None and _writing(ref):
            first_temp = time.perf_counter() - began
        if json_at is None and (ref / "ct.json").exists():
            json_at = time.perf_counter() - began
        time.sleep(0.001)
    total = time.perf_counter() - began
    if proc.returncode != 0:
        raise click.ClickException(f"the uninterrupted run failed: {proc.stderr.read().decode().strip()}")
    want = {"mask": _sha(ref / "ct_seg.nii.gz"), "prob": _sha(ref / "ct_prob.nii.gz")}
    write_from = first_temp if first_temp is not None else 0.8 * total
    writing = max(0.005, (json_at or total) - write_from)  # from its first output bytes to its JSON
    echo(f"uninterrupted run: {total:.2f}s, writing from {write_from:.2f}s for {writing:.3f}s", err=True)

    rng = random.Random(seed)
    counts = dict.fromkeys(("complete", "absent", "mask only", "violation"), 0)
    trials, after_kill_temps, left_temps, bad_next = [], 0, 0, 0
    t0 = time.perf_counter()
    for k in range(kills):
        out = work / f"t{k}"
        out.mkdir()
        in_write = k % 2 == 1
        proc = subprocess.Popen([*cmd, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.perf_counter()
        if in_write:  # wait for its first output bytes, then kill somewhere in the writing
            while proc.poll() is None and not _writing(out):
                time.sleep(0.0005)
            time.sleep(rng.uniform(0.0, 1.2 * writing))
        else:
            time.sleep(rng.uniform(0.0, total))
        delay = time.perf_counter() - started
        exited_first = proc.poll() is not None
        if not exited_first:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = classify(out, "ct", want)
        counts[state] += 1
        stale = temps(out)
        after_kill_temps += len(stale)
        nxt = subprocess.run([*cmd, "-o", str(out), "--skip-existing"], capture_output=True, text=True)
        skipped = "done already" in nxt.stdout
        final = classify(out, "ct", want)
        left = temps(out)
        left_temps += len(left)
        ok = nxt.returncode == 0 and final == "complete" and not left and (skipped == (state == "complete"))
        bad_next += not ok
        trials.append(
            {
                "delay_s": round(delay, 3),
                "aimed_at_write": in_write,
                "exited_before_kill": exited_first,
                "state": state,
                "temp_files_after_kill": len(stale),
                "next_run_ok": ok,
                "next_run_skipped": skipped,
            }
        )
        echo(f"kill {k + 1}/{kills} at {delay:.2f}s: {state}, {len(stale)} temp file(s); next run ok: {ok}", err=True)
    return {
        "kills": kills,
        "volume": {"slices": slices, "size": size, "seed": seed},
        "uninterrupted_s": round(total, 3),
        "write_window_from_s": round(write_from, 3),
        "write_window_s": round(writing, 4),
        **{k.replace(" ", "_"): v for k, v in counts.items()},
        "temp_files_after_kills": after_kill_temps,
        "temp_files_after_next_runs": left_temps,
        "next_runs_not_ok": bad_next,
        "seconds": round(time.perf_counter() - t0, 1),
        "trials": trials,
    }


def markdown(res: dict) -> str:
    mid_write = sum(t["temp_files_after_kill"] > 0 for t in res["trials"])
    return (
        f"# SIGKILL test\n\n{res['kills']} kills of seg-run on a {res['volume']['slices']}-slice "
        f"{res['volume']['size']}x{res['volume']['size']} phantom (uninterrupted run {res['uninterrupted_s']} s, "
        f"of which {res['write_window_s'] * 1000:.0f} ms writing), half of them aimed at the writes; "
        f"{mid_write} kill(s) landed mid-write (they left temp files).\n\n"
        "| kills | complete | absent | mask only (redone) | violations | temp files after kills | "
        "temp files after next run | next runs not ok | time (s) |\n|---|---|---|---|---|---|---|---|---|\n"
        f"| {res['kills']} | {res['complete']} | {res['absent']} | {res['mask_only']} | {res['violation']} | "
        f"{res['temp_files_after_kills']} | {res['temp_files_after_next_runs']} | {res['next_runs_not_ok']} | "
        f"{res['seconds']} |\n"
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--kills", default=50, show_default=True, type=click.IntRange(1, 1000), help="SIGKILLs to send.")
@click.option("--slices", default=150, show_default=True, type=click.IntRange(1, 1000))
@click.option("--size", default=256, show_default=True, type=click.IntRange(32, 1024), help="In-plane pixels.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=None, help="Write kill_test.json/.md.")
def main(kills: int, slices: int, size: int, seed: int, out_dir: Path | None) -> None:
    """Kill seg-run with SIGKILL at random moments (writes included) and check that each time the
    mask+JSON pair is complete or absent and that the next run leaves no temp file of ours.

    \b
    Example:
      python -m benchmarks.kill_test --kills 50 -o reports/kill
    """
    from .report import envelope, write_reports

    with tempfile.TemporaryDirectory(prefix="kill-test-") as tmp:
        res = run_trials(kills, slices, size, seed, Path(tmp))
    md = markdown(res)
    click.echo(md)
    failed = res["violation"] or res["next_runs_not_ok"] or res["temp_files_after_next_runs"]
    if out_dir:
        rep = {**envelope("kill-test", res), "command": " ".join(["python -m benchmarks.kill_test", *sys.argv[1:]])}
        write_reports(out_dir, "kill_test.failed" if failed else "kill_test", rep, md, [])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
