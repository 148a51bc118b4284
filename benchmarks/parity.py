"""Dice-parity suite: every model against a reference on labelled volumes, and scoring of
any predictions against labels."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from runtime.datasets import discover
from runtime.errors import InputError, SegError
from runtime.io import case_name, nifti_files, read_labels, read_volume
from runtime.metrics import case_metrics, dice, summarize
from runtime.postprocess import postprocess
from runtime.preprocess import SliceBatcher, logits_to_labels, slice_grid

MAX_DICE_DROP = 0.01  # the same per-class, per-case gate as seg-export quantize


def open_infer(path: str | Path) -> tuple[Callable[[np.ndarray], np.ndarray], object, Callable[[], None]]:
    """(infer, spec, close) for a checkpoint (PyTorch), an ONNX model or a TensorRT plan.

    TensorRT-target INT8 graphs run with ONNX Runtime's graph optimisations disabled, so their
    Q/DQ arithmetic is simulated as TensorRT computes it."""
    p = Path(path)
    if p.suffix in (".pt", ".pth"):
        import torch

        from train.checkpoint import load_checkpoint

        ck = load_checkpoint(p)
        model = ck.model()

        def infer(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()

        return infer, ck.spec, lambda: None
    from runtime.models import open_backend

    be = open_backend(p)
    if be.name == "onnxruntime":
        be.activate()
        spec = be.spec
        if spec.precision == "int8" and (spec.calibration or {}).get("target") == "tensorrt":
            be.release()
            be.optimize = False
            be.activate()
    else:
        be.activate()

    def infer(x: np.ndarray) -> np.ndarray:  # within the plan's batch profile, whatever the suite's batch
        step = be.max_batch or len(x)
        return np.concatenate([be.infer(x[i : i + step]) for i in range(0, len(x), step)])

    return infer, be.spec, be.release


def parity(
    reference: str, models: list[str], data_dir: str, max_drop: float = MAX_DICE_DROP, batch: int = 8, progress=None
) -> dict:
    """Per model and case: metrics vs ground truth, Dice vs the reference, agreement, max |logit diff|, gate."""
    cases, bad = discover(data_dir, require_labels=True)
    if not cases:
        raise InputError(f"{data_dir}: no labelled cases for parity")
    ref_infer, ref_spec, ref_close = open_infer(reference)
    opened, errors = {}, {m: None for m in models}
    for m in models:
        try:
            infer, spec, close = open_infer(m)
            if spec.preprocess != ref_spec.preprocess:
                close()
                raise InputError(f"{m}: preprocessing differs from the reference's; parity needs the same model family")
            opened[m] = (infer, spec, close)
        except (SegError, OSError) as exc:
            errors[m] = str(exc)
    results = {m: {"per_case": {}, "error": errors[m]} for m in models}
    ref_cases = {}
    for c in cases:
        try:
            vol, gt = read_volume(c.image), read_labels(c.label).data
        except SegError as exc:
            for m in opened:
                results[m]["per_case"][c.name] = {"error": str(exc)}
            continue
        grid = slice_grid(vol.data.shape[1:], vol.spacing[1:], ref_spec.preprocess)
        ref_raw = np.empty(vol.data.shape, np.uint8)
        raws = {m: np.empty(vol.data.shape, np.uint8) for m in opened}
        maxdiff = dict.fromkeys(opened, 0.0)
        batcher = SliceBatcher(vol.data, vol.spacing, ref_spec.preprocess, grid)
        for start in range(0, vol.num_slices, batch):
            stop = min(start + batch, vol.num_slices)
            x = batcher(start, stop)
            rl = ref_infer(x)
            ref_raw[start:stop] = logits_to_labels(rl, grid, ref_spec.io.activation)
            for m, (infer, spec, _) in opened.items():
                ml = infer(x)
                maxdiff[m] = max(maxdiff[m], float(np.abs(ml.astype(np.float32) - rl).max()))
                raws[m][start:stop] = logits_to_labels(ml, grid, spec.io.activation)
            if progress:
                progress(stop - start)
        ref_pp = postprocess(ref_raw)
        ref_cases[c.name] = case_metrics(ref_pp, gt, vol.spacing, affine=vol.affine)
        for m in opened:
            pp = postprocess(raws[m])
            met = case_metrics(pp, gt, vol.spacing, affine=vol.affine)
            row = {
                "metrics": met,
                "agreement": float((raws[m] == ref_raw).mean()),
                "max_abs_logit_diff": maxdiff[m],
                "dice_vs_reference": {"liver": dice(pp >= 1, ref_pp >= 1), "tumor": dice(pp == 2, ref_pp == 2)},
            }
            drops = {}
            for s in ("liver", "tumor"):
                a, b = ref_cases[c.name][s]["dice"], met[s]["dice"]
                drops[s] = None if a is None or b is None else a - b
            row["drop"] = drops
            row["pass"] = all(d is None or d <= max_drop for d in drops.values())
            results[m]["per_case"][c.name] = row
    for _, _, close in opened.values():
        close()
    ref_close()
    for m in opened:
        rows = {k: v for k, v in results[m]["per_case"].items() if "metrics" in v}
        results[m]["summary"] = summarize({k: v["metrics"] for k, v in rows.items()}) if rows else None
        results[m]["pass"] = bool(rows) and all(v["pass"] for v in rows.values())
        results[m]["agreement_mean"] = float(np.mean([v["agreement"] for v in rows.values()])) if rows else None
        results[m]["max_abs_logit_diff"] = max((v["max_abs_logit_diff"] for v in rows.values()), default=None)
    return {
        "reference": {
            "model": reference,
            "per_case": ref_cases,
            "summary": summarize(ref_cases) if ref_cases else None,
        },
        "models": results,
        "max_dice_drop": max_drop,
        "bad_cases": [f"{b.name}: {b.reason}" for b in bad],
    }


# ---------------------------------------------------------------------------------- score
def _key(name: str) -> str:
    """Case key for matching: 'x_seg' -> 'x', 'segmentation-3'/'volume-3' -> '3', Decathlon 'liver_3' stays."""
    name = re.sub(r"_seg$", "", name)
    m = re.match(r"^(?:volume|segmentation)-(\d+)$", name)
    return str(int(m.group(1))) if m else name


def label_files(label_dir: str | Path) -> dict[str, tuple[str, Path]]:
    """{match key: (case name, label path)} for a LiTS/Decathlon directory or a folder of label files."""
    root = Path(label_dir)
    try:
        cases, _ = discover(root)
        if cases:
            return {_key(c.name): (c.name, c.label) for c in cases}
    except InputError:
        pass
    files = {_key(case_name(p)): (case_name(p), p) for p in nifti_files(root)}
    if not files:
        raise InputError(f"{root}: no label files found")
    return files


def _refuse_dataset_as_predictions(root: Path, label_dir: Path) -> None:
    """Refuse a labelled dataset (CT images beside their labels) given where predictions belong:
    most likely the two arguments are swapped, and scoring would silently treat labels as predictions."""
    try:
        cases, _ = discover(root)
    except InputError:
        return
    if cases and not any(case_name(p).endswith("_seg") for p in nifti_files(root)):
        raise InputError(
            f"{root}: holds CT images with their labels (a dataset), not predictions; "
            f"the order is PRED_DIR LABEL_DIR: seg-bench score {label_dir} {root}"
        )


def score(pred_dir: str | Path, label_dir: str | Path) -> dict:
    """The LiTS table for predictions matched to labels by case name; unmatched names are reported."""
    root = Path(pred_dir)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory of predictions")
    _refuse_dataset_as_predictions(root, Path(label_dir))
    preds = {_key(case_name(p)): p for p in nifti_files(root)}
    labels = label_files(label_dir)
    per_case, problems = {}, []
    for key in sorted(set(preds) | set(labels)):
        if key not in labels:
            problems.append(f"{preds[key].name}: no label with this case name")
            continue
        name, label_path = labels[key]
        if key not in preds:
            problems.append(f"{label_path.name}: no prediction for this case")
            continue
        try:
            pred, ref = read_labels(preds[key]), read_labels(label_path)
            if pred.data.shape != ref.data.shape or not np.allclose(pred.affine, ref.affine, atol=1e-3):
                raise InputError("prediction and label are not on the same grid")
            per_case[name] = case_metrics(pred.data, ref.data, ref.spacing, affine=ref.affine)
        except SegError as exc:
            problems.append(f"{preds[key].name}: {exc}")
    return {"per_case": per_case, "summary": summarize(per_case) if per_case else None, "problems": problems}
