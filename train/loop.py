"""The training loop: Dice + cross-entropy, Adam, LR schedule, eval-mode validation on whole
volumes through the runtime's slice pipeline, early stopping, atomic resumable checkpoints,
and DistributedDataParallel when launched with torchrun."""

from __future__ import annotations

import datetime
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from runtime.datasets import Case, load_dataset
from runtime.errors import InputError
from runtime.inference import predict_labels
from runtime.io import json_text, read_labels, read_volume, write_bytes_atomic
from runtime.metrics import case_metrics, summarize
from runtime.postprocess import drop_small_tumours, postprocess, voxels_for_ml
from runtime.spec import ModelSpec

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import (
    EpochSampler,
    SliceDataset,
    SliceSampler,
    augment,
    index_cases,
    split_cases,
    write_split,
)
from .model import UNet


def select_device(name: str, local_rank: int | None = None) -> torch.device:
    """cuda > mps > cpu for "auto"; under torchrun each process takes cuda:LOCAL_RANK."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but torch sees no CUDA device; use --device auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps asked for, but this torch has no usable MPS device; use --device auto")
    if name not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device must be auto, cpu, cuda or mps; got {name!r}")
    if name == "cuda" and local_rank is not None:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def place(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move ``model`` to ``device``, channels-last where convolutions run faster that way
    (oneDNN on the CPU: 1.3-1.4x per training step on two cores; tensor cores on CUDA).
    Inputs stay NCHW: the convolutions follow the weights' layout."""
    fmt = torch.channels_last if device.type in ("cpu", "cuda") else torch.preserve_format
    return model.to(device, memory_format=fmt)


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively; emulated bf16 is slower than float32."""
    cpu = getattr(torch, "cpu", None)
    return any(
        bool(getattr(cpu, name, lambda: False)()) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --amp on this device (None: float32 throughout)."""
    if amp == "off":
        return None
    if amp == "auto":  # bf16 on the CPU trailed float32 in tumour Dice, so only when asked for
        return torch.float16 if device.type == "cuda" else None
    if device.type not in ("cuda", "cpu"):
        raise InputError(f"--amp {amp} needs a CUDA device or the CPU, not {device.type}; use --amp off")
    if amp == "fp16" and device.type != "cuda":
        raise InputError("--amp fp16 needs a CUDA device; on the CPU use --amp bf16 or off")
    return torch.float16 if amp == "fp16" else torch.bfloat16


def boundary_band(labels: torch.Tensor, width: int) -> torch.Tensor:
    """(N, H, W) float mask of pixels within ``width`` pixels of a change of label (on both sides).

    A pixel is in the band when the (2w+1)^2 window around it holds more than one label, i.e.
    when the window's max and min differ: two separable max-pools, 12x cheaper than per-class
    square pools on a 192x192 batch.
    """
    k = 2 * width + 1
    x = labels.float()[:, None]

    def window_max(t: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.max_pool2d(t, (k, 1), stride=1, padding=(width, 0)), (1, k), stride=1, padding=(0, width))

    return (window_max(x) + window_max(-x)).ne(0).float()[:, 0]


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of ``values * weight`` over the sum of ``norm`` (default: of ``weight``)."""
    return (values * weight).sum() / (weight if norm is None else norm).sum()


def loss_fn(
    logits: torch.Tensor,
    target: torch.Tensor,
    dice_weight: float = 1.0,
    class_weight: torch.Tensor | None = None,
    dice: str = "batch",
    pixel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy + soft Dice over the foreground classes (sigmoid + BCE for one channel).

    ``pixel_weight`` (N, H, W) weighs each pixel's cross-entropy (e.g. 1 + w x ``boundary_band``);
    the weighted mean divides by the sum of the weights, as PyTorch's class weights do.

    ``dice="batch"``: the soft Dice of the whole batch per class (sums over samples and pixels),
    with +1 smoothing so an absent class costs nothing. ``dice="image"``: the soft Dice of each
    image, averaged over the images whose target holds the class, so a small lesion counts as
    much as a large one; a class absent from the whole batch costs nothing.
    """
    logits = logits.float()
    if logits.shape[1] == 1:
        t = (target >= 1).float()
        if pixel_weight is None:
            ce = F.binary_cross_entropy_with_logits(logits[:, 0], t)
        else:
            ce = _weighted_mean(F.binary_cross_entropy_with_logits(logits[:, 0], t, reduction="none"), pixel_weight)
        prob, onehot = torch.sigmoid(logits), t[:, None]
    else:
        if pixel_weight is None:
            ce = F.cross_entropy(logits, target, weight=class_weight)
        else:
            # per-pixel losses already carry their class weight; the divisor must hold it too
            per_pixel = F.cross_entropy(logits, target, weight=class_weight, reduction="none")
            norm = pixel_weight if class_weight is None else pixel_weight * class_weight[target]
            ce = _weighted_mean(per_pixel, pixel_weight, norm)
        prob = logits.softmax(1)[:, 1:]
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    if dice == "batch":
        inter, denom = (prob * onehot).sum((0, 2, 3)), prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
        score = ((2 * inter + 1) / (denom + 1)).mean()
    else:
        inter, denom = (prob * onehot).sum((2, 3)), prob.sum((2, 3)) + onehot.sum((2, 3))
        present = (onehot.sum((2, 3)) > 0).float()  # (N, C)
        per_image = (2 * inter + 1) / (denom + 1)
        n = present.sum(0)
        per_class = torch.where(n > 0, (per_image * present).sum(0) / n.clamp(min=1), torch.ones_like(n))
        score = per_class.mean()
    return ce + dice_weight * (1 - score)


def lr_at(cfg: TrainConfig, epoch: float) -> float:
    """Learning rate at a (fractional) epoch: linear warm-up, then cosine or step decay.

    A pure function of the epoch, so resuming needs no scheduler object; the checkpoint
    records the schedule and the last rate for people reading it.
    """
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1e-3) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        t = (epoch - cfg.warmup_epochs) / max(1, cfg.epochs - cfg.warmup_epochs)
        return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))
    return cfg.lr * (0.3 ** int(epoch // max(1, cfg.epochs // 3)))


def ema_model(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of the weights (PyTorch's AveragedModel), or None for decay 0.

    Adam at a useful learning rate moves the weights enough between steps that whole-volume
    validation Dice swings from one epoch to the next; the average is what gets validated
    and saved as ``best``. The effective decay warms up as min(decay, (1 + n) / (10 + n)),
    so the average is not dominated by the initial weights in short runs. BatchNorm buffers
    follow the live model and are re-estimated before validation (recalibrate_bn).
    """
    if not decay:
        return None

    def lerp(avg: list[torch.Tensor], cur: list[torch.Tensor], n: torch.Tensor) -> None:
        n = float(n)
        torch._foreach_lerp_(avg, cur, 1 - min(decay, (1 + n) / (10 + n)))

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=lerp, use_buffers=False)


def evaluate_cases(
    model: torch.nn.Module,
    spec: ModelSpec,
    cases: list[Case],
    device: torch.device,
    batch: int = 16,
    progress: bool = False,
    surface: bool = False,
    min_tumour_ml: float = 0.0,
) -> dict:
    """Eval-mode whole-volume metrics through runtime.inference.predict_labels (the runtime's path),
    then runtime.postprocess.postprocess, then runtime.metrics.case_metrics."""
    model.eval()

    @torch.inference_mode()
    def infer(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x).to(device)).float().cpu().contiguous().numpy()

    per_case = {}
    for c in tqdm(cases, desc="validate", unit="case", leave=False, disable=not progress):
        vol = read_volume(c.image)
        ref = read_labels(c.label).data
        pred = postprocess(predict_labels(vol.data, vol.spacing, spec, infer, batch))
        drop_small_tumours(pred, voxels_for_ml(min_tumour_ml, vol.affine))
        per_case[c.name] = case_metrics(pred, ref, vol.spacing, surface=surface, affine=vol.affine)
    return per_case


def _bn_layers(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _fg_dice(a: torch.Tensor, b: torch.Tensor) -> float | None:
    a, b = a >= 1, b >= 1
    total = int(a.sum() + b.sum())
    return None if total == 0 else 2 * int((a & b).sum()) / total


def _labels(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


def recalibrate_bn(
    model: torch.nn.Module,
    ds: SliceDataset,
    items: list[tuple[int, int, int]],
    device: torch.device,
    batch: int = 16,
    recalibrate: bool = True,
) -> dict:
    """Recompute BatchNorm running statistics exactly on full-size, un-augmented slices.

    Training sees augmented crops, and the running averages lag weights that move quickly;
    in a short run that can make eval mode collapse although train mode (batch statistics)
    still segments. Inference feeds whole slices, so the statistics are re-estimated on
    whole slices with the current weights (a cumulative average, momentum None), which
    makes the eval-mode validation Dice the number that counts.

    Returns how well eval mode agrees with train mode on one batch of these slices (foreground
    Dice between the two label maps), before and after: ``bn_agree_before`` far below 1 is
    the collapse the recalibration repairs. With ``recalibrate=False`` only the check runs.
    """
    bns = _bn_layers(model)
    if not bns:
        return {}
    probe = [ds.sample(ci, s)[0] for ci, s, _ in items[:batch]]
    if not probe:
        return {}
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    x0 = torch.from_numpy(np.stack(probe)).to(device)
    with torch.no_grad():
        model.eval()
        eval_before = _labels(model(x0))
        model.train()
        train_mode = _labels(model(x0))  # batch statistics; this also moves the running stats:
        for m, (mean, var, n) in zip(bns, saved):  # put them back
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)
    report = {"bn_agree_before": _fg_dice(eval_before, train_mode)}
    if not recalibrate:
        model.eval()
        return report
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(items), batch):
            x = np.stack([ds.sample(ci, s)[0] for ci, s, _ in items[i : i + batch]])
            model(torch.from_numpy(x).to(device))
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
        report["bn_agree_after"] = _fg_dice(_labels(model(x0)), train_mode)
    return report


def val_score(summary: dict) -> float:
    """Early-stopping score: mean of the liver and tumour mean per-case Dice (classes present)."""
    vals = [
        summary[s]["dice_per_case_mean"]
        for s in ("liver", "tumor")
        if s in summary and summary[s]["dice_per_case_mean"] is not None
    ]
    return float(np.mean(vals)) if vals else 0.0


def _rng_state() -> dict:
    """RNG states of torch, numpy and python as tensors and plain values (weights_only-loadable)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "numpy" in st:
        n = st["numpy"]
        np.random.set_state(
            ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
    if "python" in st:
        p = st["python"]
        random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def _dist() -> tuple[int, int, int | None]:
    """(rank, world size, local rank); joins the process group torchrun describes in the environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, None


def check_run_dir(out: Path, resume: bool) -> None:
    """Fail before any training if the run directory cannot be written or would be clobbered."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory; choose another --out")
    if not resume and (out / "last.pt").exists():
        raise InputError(f"{out}: already holds a run (last.pt); add --resume to continue it or choose another --out")
    if resume and not (out / "last.pt").exists():
        raise InputError(f"{out / 'last.pt'}: nothing to resume; run without --resume first")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(
            f"{out}: cannot write the run directory ({exc.strerror or exc}); choose a writable --out"
        ) from exc


def fit(data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig, resume: bool = False, log=print) -> dict:
    """Train; returns the final summary. Every input check runs before the first file is
    written, and only rank 0 writes files."""
    cfg.validate()
    rank, world, local_rank = _dist()
    out = Path(out_dir)
    progress = sys.stderr.isatty() and rank == 0
    cases = load_dataset(data_dir)
    train_cases, val_cases = split_cases(cases, cfg.val_fraction, cfg.split_seed_value, cfg.val_cases or None)
    device = select_device(cfg.device, local_rank)
    autocast = amp_dtype(cfg.amp, device)
    if device.type == "cpu":  # share the cores between the processes of this node
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // local_world))
    elif cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    provenance = {
        "dataset": Path(data_dir).resolve().name,
        "train_cases": [c.name for c in train_cases],
        "val_cases": [c.name for c in val_cases],
        "seed": cfg.seed,
        "split_seed": cfg.split_seed_value,
        "torch": torch.__version__,
        "amp": str(autocast).removeprefix("torch.") if autocast else "off",
        "config": asdict(cfg),
    }
    spec = cfg.spec(provenance)
    model = UNet(**spec.model)
    try:
        model.check_input_size(cfg.size, cfg.size)
        if cfg.crop:
            model.check_input_size(cfg.crop, cfg.crop)
    except ValueError as exc:
        raise InputError(f"--size/--crop: {exc}") from None
    index = index_cases(train_cases)
    fractions = (cfg.tumour_oversampling, cfg.liver_oversampling, 1 - cfg.tumour_oversampling - cfg.liver_oversampling)
    sampler = SliceSampler(index, cfg.seed, fractions)
    if rank == 0:
        check_run_dir(out, resume)
        log(
            f"training on {device}, {provenance['amp'] + ' mixed precision' if autocast else 'float32'}; "
            "validation in float32"
        )
        if autocast == torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16():
            log("warning: this CPU has no native bf16 (AVX512-BF16 or AMX): --amp bf16 will be slower than --amp off")
    ck = load_checkpoint(out / "last.pt") if resume else None
    if ck is not None:
        if ck.spec.model != spec.model or ck.spec.preprocess != spec.preprocess:
            raise InputError(
                f"{out / 'last.pt'}: was trained with a different model or preprocessing; resume with the same options"
            )
        if ck.spec.provenance.get("val_cases") not in (None, provenance["val_cases"]):
            raise InputError(
                f"{out / 'last.pt'}: was validated on {', '.join(ck.spec.provenance['val_cases'])}; "
                "resume with the same --seed, --split-seed and --val-cases"
            )
    place(model, device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast == torch.float16)  # bf16 needs no loss scaling
    start_epoch, best, stale = 0, -1.0, 0
    ema = ema_model(model, cfg.ema)
    if ck is not None:
        model.load_state_dict(ck.state_dict)
        if ema is not None:
            if "ema" not in ck.extra:
                raise InputError(f"{out / 'last.pt'}: was trained without --ema; resume with --ema 0")
            ema.load_state_dict(ck.extra["ema"])
        opt.load_state_dict(ck.extra["optimizer"])
        if ck.extra.get("scaler"):
            scaler.load_state_dict(ck.extra["scaler"])
        start_epoch, best, stale = int(ck.extra["epoch"]), float(ck.extra["best"]), int(ck.extra["stale"])
        _set_rng_state(ck.extra["rng"])
        if rank == 0:
            _truncate_log(out / "metrics.jsonl", start_epoch)
            log(f"resuming after epoch {start_epoch} (best validation score {best:.4f})")
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if rank == 0:
        write_split(out / "split.json", train_cases, val_cases, cfg.split_seed_value)
        write_bytes_atomic(out / "config.json", json_text(asdict(cfg), indent=2).encode())

    per_epoch = cfg.steps_per_epoch * cfg.batch_size
    ds = SliceDataset(
        train_cases, spec.preprocess, sampler, per_epoch, cfg.crop or None, cfg.seed, rank, world, cfg.cache_volumes
    )
    ep_sampler = EpochSampler(per_epoch)
    dl = torch.utils.data.DataLoader(
        ds,
        batch_size=cfg.batch_size,
        sampler=ep_sampler,
        num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
        prefetch_factor=4 if cfg.workers else None,
    )
    class_weight = (
        torch.tensor([1.0, 1.0, cfg.tumour_weight], device=device)
        if cfg.classes == 3 and cfg.tumour_weight != 1
        else None
    )
    aug = dict(
        rotate_deg=cfg.rotate_deg,
        scale=(1 - cfg.scale_range, 1 + cfg.scale_range),
        shift=cfg.shift,
        intensity=cfg.intensity,
        noise=cfg.noise,
        elastic=cfg.elastic,
        liver_shift=cfg.liver_shift / (cfg.window_high - cfg.window_low),
    )
    summary: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        ep_sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch * 7 + rank)
        net.train()
        losses = []
        bar = tqdm(dl, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress, leave=False)
        for step, (x, y) in enumerate(bar):
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, epoch + step / max(1, len(dl)))
            x, y = augment(x, y, gen, **aug)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                logits = net(x)
            pixel_weight = (
                1 + cfg.boundary_weight * boundary_band(y if cfg.classes == 3 else y >= 1, cfg.boundary_width)
                if cfg.boundary_weight
                else None
            )
            loss = loss_fn(logits, y, cfg.dice_weight, class_weight, cfg.dice, pixel_weight)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                ema.update_parameters(model)
            losses.append(float(loss.detach()))
            bar.set_postfix(
                loss=f"{np.mean(losses[-20:]):.3f}",
                slices_s=f"{(step + 1) * cfg.batch_size * world / (time.perf_counter() - t0):.1f}",
            )
        train_loss = float(np.mean(losses))
        if world > 1:
            import torch.distributed as dist

            t = torch.tensor([train_loss], device=device)
            dist.all_reduce(t)
            train_loss = float(t) / world
        train_time = time.perf_counter() - t0
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "lr": opt.param_groups[0]["lr"],
            "train_s": round(train_time, 1),
            "slices_per_s": round(per_epoch * world / train_time, 1),
        }
        stop = False
        if rank == 0 and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
            tv = time.perf_counter()
            bn_items = [
                (ci, s, 2)
                for ci, s, _ in SliceSampler(index, cfg.seed + 1, (0, 0, 1)).draw(
                    10_000 + epoch, max(cfg.bn_slices, 16)
                )
            ]
            scored = model if ema is None else ema.module
            record.update(recalibrate_bn(scored, ds, bn_items, device, recalibrate=cfg.bn_slices > 0))
            per_case = evaluate_cases(scored, spec, val_cases, device, progress=progress)
            summary = summarize(per_case)
            score = val_score(summary)
            record.update(
                {
                    "val_liver_dice": summary["liver"]["dice_per_case_mean"],
                    "val_tumor_dice": summary.get("tumor", {}).get("dice_per_case_mean"),
                    "val_score": score,
                    "val_s": round(time.perf_counter() - tv, 1),
                    "val_per_case": {
                        k: {s: v[s]["dice"] for s in ("liver", "tumor") if s in v} for k, v in per_case.items()
                    },
                }
            )
            if score > best:
                best, stale = score, 0
                final = spec.with_(
                    provenance={
                        **provenance,
                        "epochs": epoch + 1,
                        "val_liver_dice": record["val_liver_dice"],
                        "val_tumor_dice": record["val_tumor_dice"],
                        "val_score": score,
                        "date": datetime.date.today().isoformat(),
                    }
                )
                save_checkpoint(out / "best.pt", scored, final, epoch=epoch + 1, best=best)
            else:
                stale += 1
            stop = stale >= cfg.patience
        if world > 1:
            import torch.distributed as dist

            flag = torch.tensor([int(stop)], device=device)
            dist.broadcast(flag, 0)
            stop = bool(flag)
        if rank == 0:
            record["time_s"] = round(time.perf_counter() - t0, 1)
            _append_jsonl(out / "metrics.jsonl", record)  # before last.pt: a resume drops lines past its epoch
            state = spec.with_(
                provenance={
                    **provenance,
                    "epochs": epoch + 1,
                    "best_val_score": best,
                    "date": datetime.date.today().isoformat(),
                }
            )
            save_checkpoint(
                out / "last.pt",
                model,
                state,
                optimizer=opt.state_dict(),
                scaler=scaler.state_dict(),
                scheduler={
                    "kind": cfg.schedule,
                    "warmup_epochs": cfg.warmup_epochs,
                    "epochs": cfg.epochs,
                    "lr": float(opt.param_groups[0]["lr"]),
                },
                epoch=epoch + 1,
                best=best,
                stale=stale,
                rng=_rng_state(),
                **({"ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()}} if ema is not None else {}),
            )
            _plot(out)
            msg = f"epoch {epoch + 1}: loss {train_loss:.4f}, {train_time:.0f}s ({record['slices_per_s']} slices/s)"
            if "val_score" in record:
                msg += (
                    f"; eval-mode val Dice liver {_f(record['val_liver_dice'])} tumour {_f(record['val_tumor_dice'])}"
                    f" ({record['val_s']:.0f}s)"
                )
                if "bn_agree_before" in record:
                    before, after = _f(record["bn_agree_before"]), _f(record.get("bn_agree_after"))
                    msg += f"; eval/train-mode agreement {before} -> {after}"
            log(msg)
        if stop:
            if rank == 0:
                log(f"early stop: no validation improvement for {cfg.patience} validations")
            break
    return {"best_score": best, "summary": summary, "model": model if ema is None else ema.module}


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _append_jsonl(path: Path, record: dict) -> None:
    """Append one line; rewrite atomically so an interrupted run never leaves half a line."""
    old = path.read_bytes() if path.exists() else b""
    write_bytes_atomic(path, old + (json_text(record) + "\n").encode())


def _truncate_log(path: Path, epoch: int) -> None:
    """Keep the lines of epochs <= epoch (those of an epoch whose last.pt was never written go)."""
    if path.exists():
        keep = [r for r in read_log(path) if r.get("epoch", 0) <= epoch]
        write_bytes_atomic(path, "".join(json_text(r) + "\n" for r in keep).encode())


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plot(out: Path) -> None:
    """Loss and Dice curves as PNG (matplotlib, Agg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    import io

    log = read_log(out / "metrics.jsonl")
    ep = [r["epoch"] for r in log]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(ep, [r["train_loss"] for r in log], marker="o")
    a.set_xlabel("epoch")
    a.set_ylabel("train loss (CE + Dice)")
    a.grid(alpha=0.3)
    v = [r for r in log if "val_score" in r]
    for key, label in (("val_liver_dice", "liver"), ("val_tumor_dice", "tumour")):
        b.plot([r["epoch"] for r in v], [r[key] if r[key] is not None else np.nan for r in v], marker="o", label=label)
    b.set_xlabel("epoch")
    b.set_ylabel("eval-mode validation Dice (per case)")
    b.set_ylim(0, 1)
    b.grid(alpha=0.3)
    b.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_bytes_atomic(out / "curves.png", buf.getvalue())
