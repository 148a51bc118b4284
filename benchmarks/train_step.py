"""Training-step time of the UNet per width and memory layout.

One step is what seg-train repeats for every batch: forward, the Dice + cross-entropy loss,
backward and an Adam update, here on a fixed batch of random crops. The layouts start from
the same weights and run interleaved, step by step, so their ratio is measured under the
same machine load and their losses must agree: the layout changes the speed, not the maths.
"""

from __future__ import annotations

import copy
import time

from runtime.errors import InputError, require

from .report import _f
from .stats import summarize

LAYOUTS = ("contiguous", "channels_last")


def measure_train_steps(
    widths: list[int],
    depth: int = 4,
    batch: int = 8,
    crop: int = 192,
    channels: int = 3,
    classes: int = 3,
    warmup: int = 2,
    repeats: int = 10,
    threads: int = 0,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """Seconds per training step (summary statistics) and the loss of every step, per width and layout."""
    torch = require("torch", "train", "timing training steps")
    from train.loop import loss_fn, select_device
    from train.model import UNet

    dev = select_device(device)
    if threads:
        torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, channels, crop, crop, generator=g).to(dev)
    y = torch.randint(0, classes, (batch, crop, crop), generator=g).to(dev)
    rows = []
    for width in widths:
        torch.manual_seed(seed)
        ref = UNet(in_channels=channels, classes=classes, base_width=width, depth=depth, norm="batch")
        try:
            ref.check_input_size(crop, crop)
        except ValueError as exc:
            raise InputError(f"--crop: {exc}") from None
        runs = {}
        for layout in LAYOUTS:
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            model = copy.deepcopy(ref).to(dev, memory_format=fmt).train()
            runs[layout] = (model, torch.optim.Adam(model.parameters(), lr=1e-3), [], [])
        for step in range(warmup + repeats):
            for model, opt, times, losses in runs.values():
                sync()
                t0 = time.perf_counter()
                loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sync()
                dt = time.perf_counter() - t0
                losses.append(float(loss.detach()))
                if step >= warmup:
                    times.append(dt)
        params = sum(p.numel() for p in ref.parameters())
        for layout, (_, _, times, losses) in runs.items():
            s = summarize(times)
            rows.append(
                {
                    "width": width,
                    "layout": layout,
                    "params": params,
                    "step_s": s,
                    "slices_per_s": batch / s["median"],
                    "losses": losses,
                }
            )
    return {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "depth": depth,
        "batch": batch,
        "crop": crop,
        "channels": channels,
        "warmup": warmup,
        "repeats": repeats,
        "rows": rows,
    }


def speedups(rows: list[dict]) -> dict[int, float]:
    """Per width: median contiguous step time / median channels-last step time."""
    med = {(r["width"], r["layout"]): r["step_s"]["median"] for r in rows}
    return {
        w: med[(w, "contiguous")] / med[(w, "channels_last")]
        for w in sorted({r["width"] for r in rows})
        if (w, "contiguous") in med and (w, "channels_last") in med
    }


def train_step_markdown(rep: dict) -> str:
    up = speedups(rep["rows"])
    out = [
        f"# Training step: batch {rep['batch']} x {rep['channels']} x {rep['crop']} x {rep['crop']}, depth "
        f"{rep['depth']}",
        "",
        f"{rep['machine']['cpu']}, {rep['device']}, {rep['threads']} threads, torch {rep['torch']}; "
        f"median of {rep['repeats']} steps after {rep['warmup']} warm-up steps, layouts interleaved.",
        "",
        "| width | layout | parameters (M) | s per step (median) | p90 | min | slices/s | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["rows"]:
        s = r["step_s"]
        gain = _f(up.get(r["width"]), 2) + "x" if r["layout"] == "channels_last" else ""
        out.append(
            f"| {r['width']} | {r['layout']} | {r['params'] / 1e6:.2f} | {s['median']:.3f} | {s['p90']:.3f} | "
            f"{s['min']:.3f} | {r['slices_per_s']:.1f} | {gain} |"
        )
    return "\n".join(out) + "\n"


def plot_train_steps(rep: dict, path):
    """Seconds per step by width, one bar per layout, with the p90 as an error bar."""
    from .report import _plt, _save

    plt = _plt()
    widths = sorted({r["width"] for r in rep["rows"]})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, layout in enumerate(LAYOUTS):
        rows = {r["width"]: r for r in rep["rows"] if r["layout"] == layout}
        xs = [k + (i - 0.5) * 0.38 for k in range(len(widths)) if widths[k] in rows]
        med = [rows[w]["step_s"]["median"] for w in widths if w in rows]
        p90 = [rows[w]["step_s"]["p90"] - rows[w]["step_s"]["median"] for w in widths if w in rows]
        ax.bar(xs, med, width=0.38, yerr=[[0] * len(p90), p90], capsize=3, label=layout)
    ax.set_xticks(range(len(widths)), [f"width {w}" for w in widths])
    ax.set_ylabel("s per training step (median; bar to p90)")
    ax.set_title(f"batch {rep['batch']}, {rep['crop']}x{rep['crop']} crops - {rep['machine']['cpu']}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out
