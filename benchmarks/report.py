"""Reports: JSON for machines, Markdown tables for people, PNG plots where a picture reads faster."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from runtime.errors import require
from runtime.io import write_bytes_atomic
from runtime.metrics import markdown_table

from .machine import machine


def _f(v, d: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{d}f}"


def envelope(kind: str, payload: dict) -> dict:
    return {"kind": kind, "command": " ".join(["seg-bench", *sys.argv[1:]]), "machine": machine(), **payload}


def label(r: dict) -> str:
    return f"{Path(r['model']).name} ({r.get('backend', '?')}, {r.get('precision', '?')})"


# ---------------------------------------------------------------------------------- latency
def latency_markdown(rep: dict) -> str:
    peak = rep.get("matmul_peak_gflops")
    rates = ", ".join(f"{k} {_f(v, 1)}" for k, v in (rep.get("matmul_gflops") or {}).items())
    out = [
        f"# Latency on {rep['machine']['cpu']} ({rep['machine']['cores']} cores)",
        "",
        f"Matrix-multiply peak (float32 2048x2048, best of the GEMMs at hand, same threads): {_f(peak, 1)} GFLOP/s"
        + (f" ({rates})" if rates else "")
        + ". "
        "ms/slice = steady-state time per slice with as many batches in flight as the backend runs at once "
        "(its streams or buffer slots; one otherwise), over repeated runs after warm-up; "
        "batch latency = one batch on its own.",
        "",
    ]
    out += [f"- {Path(str(r['model'])).name}: {r['describe']}" for r in rep["results"] if r.get("describe")]
    out += [
        "",
        "| model | batch | median ms/slice | p90 | p95 | p99 | min | max | batch latency ms | slices/s | GFLOP/s | % "
        "of matmul peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["results"]:
        if "error" in r:
            out.append(f"| {Path(str(r['model'])).name} | failed: {r['error']} |||||||||")
            continue
        for row in r["rows"]:
            s = row["per_slice_ms"]
            pct = 100 * row["gflops"] / peak if row["gflops"] and peak else None
            lat = (row.get("batch_latency_ms") or {}).get("median")
            out.append(
                f"| {label(r)} | {row['batch']} | {_f(s['median'])} | {_f(s['p90'])} | {_f(s['p95'])} | "
                f"{_f(s['p99'])} | "
                f"{_f(s['min'])} | {_f(s['max'])} | {_f(lat)} | {_f(row['throughput_slices_s'], 1)} | "
                f"{_f(row['gflops'], 1)} | {_f(pct, 0)} |"
            )
    out += [
        "",
        "## Whole volume, end to end",
        "",
        "Stage times are each stage's own work (stages overlap in threads, so they need not add up to the wall time). "
        "'wall / backend alone' divides the wall time by slices x the median ms/slice at the same batch size.",
        "",
        "| model | volume | slices | batch | wall s (median) | ms/slice | read | preprocess | infer | postprocess | "
        "write | wall / backend alone | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["results"]:
        for v in r.get("volumes", []):
            st = v.get("stages_s") or {}
            wall = v["wall_s"]["median"]
            alone = next(
                (row["per_slice_ms"]["median"] for row in r.get("rows", []) if row["batch"] == v["batch"]), None
            )
            ratio = wall / (v["slices"] * alone / 1000) if alone else None
            out.append(
                f"| {label(r)} | {v['volume']} | {v['slices']} | {v['batch']} | {_f(wall)} | "
                f"{_f(1000 * wall / v['slices'], 1)} | "
                + " | ".join(_f(st.get(k)) for k in ("read", "preprocess", "infer", "postprocess", "write"))
                + f" | {_f(ratio)} | {_f(r.get('peak_rss_mb'), 0)} |"
            )
    ratios = rep.get("ratios") or {}
    if ratios:
        out += ["", "## Ratios (same run)", ""] + [f"- {k}: {v:.2f}x" for k, v in ratios.items()]
    return "\n".join(out) + "\n"


def latency_ratios(results: list[dict]) -> dict:
    """End-to-end speed of each model relative to the FP32 ONNX model and the PyTorch baseline."""
    walls = {label(r): r["volumes"][0]["wall_s"]["median"] for r in results if "error" not in r and r.get("volumes")}
    out = {}
    fp32 = next((k for k in walls if "onnxruntime" in k and "fp32" in k), None)
    torch_base = next((k for k in walls if "pytorch-eager" in k), None)
    for k, w in walls.items():
        if fp32 and k != fp32:
            out[f"{k} vs {fp32}, end to end"] = walls[fp32] / w
        if torch_base and k != torch_base:
            out[f"{k} vs {torch_base}, end to end"] = walls[torch_base] / w
    return out


# ---------------------------------------------------------------------------------- parity
def parity_markdown(rep: dict) -> str:
    drop = rep["max_dice_drop"]
    ref = rep["reference"]
    out = [
        f"# Dice parity against {Path(ref['model']).name}",
        "",
        f"Gate: no case may lose more than {drop} Dice (liver or tumour) against the reference's Dice with the ground "
        "truth.",
        "",
        "| model | precision | liver Dice (mean / global) | tumour Dice (mean / global) | Dice vs reference (liver / "
        "tumour, mean) | argmax agreement | max abs logit diff | worst drop | gate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rs = ref.get("summary") or {}
    if rs:
        out.append(
            f"| {Path(ref['model']).name} (reference) | fp32 | {_f(rs['liver']['dice_per_case_mean'], 4)} / "
            f"{_f(rs['liver']['dice_global'], 4)} | "
            f"{_f(rs['tumor']['dice_per_case_mean'], 4)} / {_f(rs['tumor']['dice_global'], 4)} | | | | | |"
        )
    for m, r in rep["models"].items():
        if r.get("error"):
            out.append(f"| {Path(m).name} | failed: {r['error']} |||||||| FAIL |")
            continue
        s = r["summary"] or {}
        rows = [v for v in r["per_case"].values() if "metrics" in v]
        vs = {
            k: [v["dice_vs_reference"][k] for v in rows if v["dice_vs_reference"][k] is not None]
            for k in ("liver", "tumor")
        }
        drops = [d for v in rows for d in v["drop"].values() if d is not None]
        prec = r.get("precision", "")
        out.append(
            f"| {Path(m).name} | {prec} | {_f(s['liver']['dice_per_case_mean'], 4)} / "
            f"{_f(s['liver']['dice_global'], 4)} | "
            f"{_f(s['tumor']['dice_per_case_mean'], 4)} / {_f(s['tumor']['dice_global'], 4)} | "
            f"{_f(sum(vs['liver']) / len(vs['liver']) if vs['liver'] else None, 4)} / "
            f"{_f(sum(vs['tumor']) / len(vs['tumor']) if vs['tumor'] else None, 4)} | "
            f"{_f(r['agreement_mean'], 5)} | {_f(r['max_abs_logit_diff'], 3)} | "
            f"{_f(max(drops) if drops else None, 4)} | {'pass' if r['pass'] else 'FAIL'} |"
        )
    out += [
        "",
        "## Reference against ground truth (LiTS metrics)",
        "",
        markdown_table(ref["per_case"], rs) if rs else "(no cases)",
    ]
    for m, r in rep["models"].items():
        rows = {k: v for k, v in r.get("per_case", {}).items() if "metrics" in v}
        if rows:
            out += [
                "",
                f"## {Path(m).name}: per case",
                "",
                "| case | liver Dice | tumour Dice | liver drop | tumour drop | agreement | gate |",
                "|---|---|---|---|---|---|---|",
            ]
            for k, v in rows.items():
                out.append(
                    f"| {k} | {_f(v['metrics']['liver']['dice'], 4)} | {_f(v['metrics']['tumor']['dice'], 4)} | "
                    f"{_f(v['drop']['liver'], 4)} | "
                    f"{_f(v['drop']['tumor'], 4)} | {_f(v['agreement'], 5)} | {'pass' if v['pass'] else 'FAIL'} |"
                )
    if rep.get("bad_cases"):
        out += ["", "Skipped cases: " + "; ".join(rep["bad_cases"])]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------- plots
def _plt():
    require("matplotlib", "plots", "plotting reports")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return write_bytes_atomic(path, buf.getvalue())


def plot_latency(rep: dict, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rep["results"]:
        if "error" in r or not r["rows"]:
            continue
        b = [row["batch"] for row in r["rows"]]
        ax.plot(b, [row["per_slice_ms"]["median"] for row in r["rows"]], marker="o", label=label(r))
        ax.fill_between(
            b,
            [row["per_slice_ms"]["min"] for row in r["rows"]],
            [row["per_slice_ms"]["p90"] for row in r["rows"]],
            alpha=0.15,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (slices)")
    ax.set_ylabel("ms per slice, batches in flight (median; band min-p90)")
    ax.set_title(f"Inference time per slice vs batch size - {rep['machine']['cpu']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_dice_bars(rep: dict, path: Path) -> Path:
    plt = _plt()
    import numpy as np

    models = [
        (Path(rep["reference"]["model"]).name + " (ref)", {k: v for k, v in rep["reference"]["per_case"].items()})
    ]
    models += [
        (Path(m).name, {k: v["metrics"] for k, v in r["per_case"].items() if "metrics" in v})
        for m, r in rep["models"].items()
        if not r.get("error")
    ]
    cases = list(rep["reference"]["per_case"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    width = 0.8 / max(1, len(models))
    for ax, s in zip(axes, ("liver", "tumor")):
        for i, (name, pc) in enumerate(models):
            vals = [(pc.get(c, {}).get(s, {}) or {}).get("dice") for c in cases]
            ax.bar(np.arange(len(cases)) + i * width, [np.nan if v is None else v for v in vals], width, label=name)
        ax.set_xticks(np.arange(len(cases)) + width * (len(models) - 1) / 2, cases, rotation=30, fontsize=8)
        ax.set_title(f"{'liver' if s == 'liver' else 'tumour'} Dice per case")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_dice_vs_latency(parity_rep: dict, latency_rep: dict, path: Path) -> Path:
    """One panel per class, one colour per model: the Dice differences between precisions are
    thousandths, so each class gets its own Dice axis."""
    plt = _plt()
    lat = {
        Path(r["model"]).name: min(row["per_slice_ms"]["median"] for row in r["rows"])
        for r in latency_rep["results"]
        if "error" not in r and r["rows"]
    }
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    ref = parity_rep.get("reference") or {}
    entries = ([(ref["model"], ref)] if ref.get("model") else []) + list(parity_rep["models"].items())
    for i, (m, r) in enumerate(entries):
        name = Path(m).name
        if r.get("error") or name not in lat or not r.get("summary"):
            continue
        for ax, cls in zip(axes, ("liver", "tumor")):
            d = r["summary"][cls]["dice_per_case_mean"]
            if d is not None:
                ax.scatter(lat[name], d, s=60, color=f"C{i}", label=name)
    for ax, title in zip(axes, ("liver", "tumour")):
        ax.set_xlabel("best ms per slice")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
        lo, hi = ax.get_ylim()
        if hi - lo < 0.01:  # at least 0.01 of Dice: thousandths should look like thousandths
            mid = (lo + hi) / 2
            ax.set_ylim(mid - 0.005, mid + 0.005)
    axes[0].set_ylabel("mean per-case Dice vs ground truth")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle("Accuracy vs speed across precisions", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out = _save(fig, path)
    plt.close(fig)
    return out


def write_reports(out_dir: Path, stem: str, rep: dict, markdown: str, plots: list) -> list[Path]:
    """Write <stem>.json and <stem>.md together (both or neither, never half a report), then the
    plots. Callers write only a run that succeeded, so a good report is never replaced by a
    failed run's."""
    from runtime.io import json_bytes
    from runtime.outputs import write_group_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    written = write_group_atomic(
        [
            (out_dir / f"{stem}.md", markdown.encode()),
            (out_dir / f"{stem}.json", json_bytes(rep)),
        ]
    )
    for fn, name in plots:
        try:
            written.append(fn(out_dir / name))
        except Exception as exc:  # a plot must not cost the numbers
            print(f"warning: plot {name} not written: {exc}", file=sys.stderr)
    return written


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
