"""Checkpoints: weights plus the spec as JSON, loaded with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain values only (no pickled classes), so loading a
file from elsewhere never executes code.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime.errors import InputError
from runtime.io import write_bytes_atomic
from runtime.spec import ModelSpec

from .model import UNet

FORMAT = "unet-edge/checkpoint"


@dataclass
class Checkpoint:
    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)

    def model(self) -> UNet:
        """The network in eval mode with these weights."""
        net = build_model(self.spec)
        net.load_state_dict(self.state_dict)
        return net.eval()


def build_model(spec: ModelSpec) -> UNet:
    return UNet(**spec.model)


def save_checkpoint(path: str | Path, model: torch.nn.Module, spec: ModelSpec, **extra: Any) -> Path:
    """Write weights, spec JSON and extra training state (plain values/tensors) atomically."""
    module = model.module if hasattr(model, "module") else model  # unwrap DDP
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "spec": spec.to_json(), "state_dict": state, **extra}, buf)
    return write_bytes_atomic(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint safely; every failure is an InputError/SpecError that says what to do."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p}: is a directory; give the checkpoint file (e.g. runs/demo/best.pt)")
    if not p.is_file():
        raise InputError(f"{p}: no such checkpoint file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: the checkpoint file is empty; was the copy or the training interrupted?")
    try:
        with (
            warnings.catch_warnings()
        ):  # torch warns about the pickle protocol of a foreign file; we refuse it in one line
            warnings.simplefilter("ignore")
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"{p}: not a readable checkpoint ({_first_line(exc)}); is it complete?") from exc
    except Exception as exc:  # weights_only refuses pickled objects: not one of ours
        raise InputError(
            f"{p}: refused to load ({type(exc).__name__}); only seg-train checkpoints are accepted"
        ) from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("state_dict"), dict):
        raise InputError(f"{p}: not a seg-train checkpoint (no '{FORMAT}' marker)")
    spec = ModelSpec.from_json(obj["spec"])
    extra = {k: v for k, v in obj.items() if k not in ("format", "spec", "state_dict")}
    ckpt = Checkpoint(spec, obj["state_dict"], extra)
    try:
        build_model(spec).load_state_dict(ckpt.state_dict)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InputError(f"{p}: weights do not match the model config in its spec ({_first_line(exc)})") from exc
    return ckpt


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:120] if lines else type(exc).__name__
