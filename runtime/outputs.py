"""seg-run's outputs: unique names, recognising our own files, all-or-nothing writes, stale temp files.

Every file we write goes first to a temporary file named ``.unet-edge-<host>-<pid>-<random>.part``
in the target folder, so a later run can tell our temp files from anyone else's and remove the
ones whose process is gone (a run killed with SIGKILL leaves them). A volume's outputs (mask,
probabilities, overlay, JSON) are written as one group: every temp file is written in full
first, then they are renamed into place with the JSON last. The JSON records the mask's sha256,
so a mask is "done" only when a JSON beside it records exactly its bytes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import InputError, SegError

TEMP_PREFIX = ".unet-edge-"
TEMP_SUFFIX = ".part"
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
_TEMP_RE = re.compile(r"^\.unet-edge-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[^/]*\.part$")
OUTPUT_SUFFIXES = ("_seg.nii.gz", "_seg.nii", "_prob.nii.gz", "_prob.nii")
# written into the NIfTI header's descrip field of every image seg-run writes
STAMP = b"unet-edge seg-run output"
_FULL = (errno.ENOSPC, errno.EDQUOT) if hasattr(errno, "EDQUOT") else (errno.ENOSPC,)


class DiskFullError(SegError):
    """The output filesystem is full (or over quota); nothing of the volume was kept."""


def temp_prefix() -> str:
    """The prefix of this process's temp files (host and pid make them recognisable)."""
    return f"{TEMP_PREFIX}{_HOST}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    except OverflowError:
        return False
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove our temp files in ``folder`` left by processes of this host that are gone.

    Only files named by ``temp_prefix`` are touched; ones from another host (a shared folder)
    or from a live process are left alone. Returns the files removed.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TEMP_RE.match(e.name)
        if not m or m["host"] != _HOST or _pid_alive(int(m["pid"])):
            continue
        try:
            if e.is_file(follow_symlinks=False):
                os.unlink(e.path)
                removed.append(Path(e.path))
        except OSError:
            pass
    return removed


def disk_full_message(folder: Path, exc: OSError) -> str:
    why = exc.strerror or "no space left"
    return f"not written: the disk is full at {folder} ({why}); free some space there or choose another -o"


def _write_temp(folder: Path, data: bytes) -> str:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=temp_prefix(), suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_group_atomic(files: Iterable[tuple[Path, bytes]]) -> list[Path]:
    """Write several files all or nothing, renamed into place in the order given (put the file
    that says "done", the JSON, last). On any failure every temp file and every file of the group
    already renamed is removed, and a full disk becomes one DiskFullError naming the folder."""
    files = [(Path(p), data) for p, data in files]
    temps: list[tuple[str, Path]] = []
    placed: list[Path] = []
    folder = Path(".")
    try:
        for p, data in files:
            folder = p.parent if str(p.parent) else Path(".")
            if not folder.is_dir():
                raise InputError(f"{folder}: output directory does not exist; create it first")
            temps.append((_write_temp(folder, data), p))
        for tmp, p in temps:
            os.replace(tmp, p)
            placed.append(p)
    except BaseException as exc:
        for tmp, _ in temps:
            _unlink(tmp)
        for p in placed:
            _unlink(p)
        if isinstance(exc, OSError) and exc.errno in _FULL:
            raise DiskFullError(disk_full_message(folder, exc)) from exc
        raise
    return placed


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_our_output(path: Path) -> bool:
    """A mask or probability map seg-run wrote: its name ends in _seg/_prob.nii[.gz] and its header
    carries our stamp, or a JSON of ours beside it names it (outputs of versions before the stamp)."""
    name = path.name
    for suf in OUTPUT_SUFFIXES:
        if name.endswith(suf):
            base = name[: -len(suf)]
            break
    else:
        return False
    try:
        import nibabel as nib

        if bytes(nib.load(str(path)).header["descrip"].item()).startswith(STAMP):
            return True
    except Exception:
        pass
    try:
        import json

        rec = json.loads((path.parent / f"{base}.json").read_text())
        return isinstance(rec, dict) and path.name in {
            Path(str(rec.get(k, ""))).name for k in ("mask", "probabilities")
        }
    except (OSError, ValueError):
        return False


def _strip_nifti(name: str) -> str:
    for suf in (".nii.gz", ".nii", ".dcmseries"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def _suffix_tag(name: str) -> str:
    return "nii_gz" if name.endswith(".nii.gz") else "nii" if name.endswith(".nii") else ""


def output_names(paths: list[Path]) -> dict[Path, str]:
    """Unique output base names, deterministic for a given list of inputs.

    Each input's name is its file name without .nii/.nii.gz. Inputs whose names would clash
    (compared ignoring case, as macOS and Windows file systems do) are named by their path
    relative to the folder the clashing inputs share, with '_' for '/' (pats/a/ct.nii.gz and
    pats/b/ct.nii.gz: a_ct and b_ct); if that still clashes (scan.nii beside scan.nii.gz) the
    extension is added (scan_nii, scan_nii_gz). Any clash left is refused by check_names.
    """
    plain = {p: _strip_nifti(p.name) for p in paths}
    groups: dict[str, list[Path]] = {}
    for p, n in plain.items():
        groups.setdefault(n.lower(), []).append(p)
    names = dict(plain)
    for group in groups.values():
        if len(group) < 2:
            continue
        absolute = [Path(os.path.abspath(p)) for p in group]
        common = Path(os.path.commonpath([str(a.parent) for a in absolute]))
        rel = {p: "_".join(a.relative_to(common).parts) for p, a in zip(group, absolute)}
        by_rel: dict[str, int] = {}
        for p in group:
            key = _strip_nifti(rel[p]).lower()
            by_rel[key] = by_rel.get(key, 0) + 1
        for p in group:
            stem = _strip_nifti(rel[p])
            names[p] = stem if by_rel[stem.lower()] == 1 else f"{stem}_{_suffix_tag(p.name)}".rstrip("_")
    return names


def check_names(names: dict[Path, str]) -> None:
    """Refuse names that are not plain file names, or that two inputs share (listing them all)."""
    for p, n in names.items():
        if not n or n in (".", "..") or "/" in n or "\\" in n or "\0" in n or n.startswith("."):
            raise InputError(
                f"{p}: output name {n!r} is not a plain file name; give names without '/' or a leading '.'"
            )
    seen: dict[str, list[Path]] = {}
    for p, n in names.items():
        seen.setdefault(n.lower(), []).append(p)
    clashes = {k: v for k, v in seen.items() if len(v) > 1}
    if clashes:
        listed = "; ".join(f"{names[v[0]]!r}: " + ", ".join(str(p) for p in v) for v in clashes.values())
        raise InputError(
            f"{sum(len(v) for v in clashes.values())} inputs would write the same outputs ({listed}); "
            "rename them or run them into separate -o folders"
        )


def why_not_done(
    json_path: Path,
    mask_path: Path,
    input_sha: Callable[[], str],
    model_sha: str | None,
    settings: dict,
    prob_path: Path | None = None,
) -> str | None:
    """None when ``mask_path`` is a finished result of this input, model and settings: the JSON
    beside it records the sha256 of the input, of the model and of the mask (re-hashed here).
    Otherwise the reason, in words, why it must be done again."""
    import json

    from .models import file_sha256

    if not json_path.is_file():
        return f"no {json_path.name} records a finished mask"
    try:
        rec = json.loads(json_path.read_text())
        if not isinstance(rec, dict):
            raise ValueError("not an object")
    except (OSError, ValueError):
        return f"{json_path.name} is unreadable"
    if not mask_path.is_file():
        return f"{mask_path.name} is missing"
    if "mask_sha256" not in rec or "input_sha256" not in rec:
        return f"{json_path.name} records no checksums (written by an older version)"
    if rec.get("model_sha256") != model_sha:
        return "it was made with another model"
    changed = [k for k, v in settings.items() if rec.get(k) != v]
    if changed:
        return f"it was made with other options ({', '.join(changed)})"
    if rec["input_sha256"] != input_sha():
        return "the input has changed since"
    if rec["mask_sha256"] != file_sha256(mask_path):
        return f"{mask_path.name} does not match the sha256 its JSON records (incomplete or changed)"
    if prob_path is not None:
        if not prob_path.is_file() or rec.get("probabilities_sha256") != file_sha256(prob_path):
            return f"{prob_path.name} is missing or does not match its JSON"
    return None
