"""The model spec: everything needed to run a model correctly, as one versioned JSON object.

It travels inside the checkpoint, inside the ONNX file (``metadata_props``) and beside a
TensorRT plan, so ``seg-run`` needs nothing but the model path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import SpecError

SCHEMA_VERSION = 1
METADATA_KEY = "unet_edge.spec"  # key in ONNX metadata_props
CLASS_NAMES = ("background", "liver", "tumor")


@dataclass(frozen=True)
class Preprocess:
    """How CT slices become model input (the one preprocessing; see runtime.preprocess)."""

    window: tuple[float, float] = (-200.0, 250.0)  # HU clipped to [lo, hi], scaled to [0, 1]
    mode: str = "spacing"  # "spacing": fixed mm/pixel + centre crop/pad; "resize": stretch
    spacing_mm: float = 1.5  # in-plane target spacing (mode "spacing")
    size: tuple[int, int] = (256, 256)  # model input rows, cols
    context: int = 1  # k neighbours on each side -> 2k+1 input channels
    orientation: str = "RAS"  # canonical orientation slices are cut from (axial = last axis)

    @property
    def channels(self) -> int:
        return 2 * self.context + 1

    def validate(self) -> None:
        lo, hi = self.window
        if not lo < hi:
            raise SpecError(f"preprocess.window must be [low, high] with low < high, got {list(self.window)}")
        if self.mode not in ("spacing", "resize"):
            raise SpecError(f"preprocess.mode must be 'spacing' or 'resize', got {self.mode!r}")
        if not self.spacing_mm > 0:
            raise SpecError(f"preprocess.spacing_mm must be positive, got {self.spacing_mm}")
        if len(self.size) != 2 or min(self.size) < 8:
            raise SpecError(f"preprocess.size must be two ints >= 8, got {list(self.size)}")
        if self.context < 0:
            raise SpecError(f"preprocess.context must be >= 0, got {self.context}")
        if self.orientation != "RAS":
            raise SpecError(f"preprocess.orientation must be 'RAS', got {self.orientation!r}")


@dataclass(frozen=True)
class IOLayout:
    """Tensor names, layout and dtypes of the network's input and output."""

    input_name: str = "slices"
    output_name: str = "logits"
    layout: str = "NCHW"
    input_dtype: str = "float32"
    output_dtype: str = "float32"
    activation: str = "softmax"  # "softmax" over classes, or "sigmoid" for one output channel


@dataclass(frozen=True)
class ModelSpec:
    """How to run one model. ``model`` holds the network constructor's keyword arguments."""

    preprocess: Preprocess = field(default_factory=Preprocess)
    classes: tuple[str, ...] = CLASS_NAMES
    io: IOLayout = field(default_factory=IOLayout)
    model: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    provenance: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def out_channels(self) -> int:
        return 1 if self.io.activation == "sigmoid" else len(self.classes)

    def validate(self) -> ModelSpec:
        self.preprocess.validate()
        if self.io.activation not in ("softmax", "sigmoid"):
            raise SpecError(f"io.activation must be 'softmax' or 'sigmoid', got {self.io.activation!r}")
        if self.io.layout != "NCHW":
            raise SpecError(f"io.layout must be 'NCHW', got {self.io.layout!r}")
        if len(self.classes) < 2 or self.classes[0] != "background":
            raise SpecError(f"classes must start with 'background', got {list(self.classes)}")
        if self.io.activation == "sigmoid" and len(self.classes) != 2:
            raise SpecError("a sigmoid model has exactly two classes (background and one foreground)")
        m = self.model
        if m:
            if m.get("in_channels", self.preprocess.channels) != self.preprocess.channels:
                raise SpecError(
                    f"model.in_channels={m.get('in_channels')} but preprocess.context={self.preprocess.context} "
                    f"gives {self.preprocess.channels} channels"
                )
            if m.get("classes", self.out_channels) != self.out_channels:
                raise SpecError(
                    f"model.classes={m.get('classes')} but the spec expects {self.out_channels} output channels"
                )
        if self.precision not in ("fp32", "fp16", "int8"):
            raise SpecError(f"precision must be fp32, fp16 or int8, got {self.precision!r}")
        return self

    def with_(self, **changes: Any) -> ModelSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocess"]["window"] = list(self.preprocess.window)
        d["preprocess"]["size"] = list(self.preprocess.size)
        d["classes"] = list(self.classes)
        # schema_version first, for people reading the JSON
        return {"schema_version": d.pop("schema_version"), **d}

    def to_json(self, indent: int | None = 2) -> str:
        """Strict JSON (non-finite measurements become null), as every JSON the project writes."""
        from .io import json_text

        return json_text(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Any) -> ModelSpec:
        if not isinstance(d, dict):
            raise SpecError(f"a model spec must be a JSON object, got {type(d).__name__}")
        version = d.get("schema_version")
        if not isinstance(version, int):
            raise SpecError("model spec has no integer 'schema_version'; is this a spec written by seg-train?")
        if version > SCHEMA_VERSION:
            raise SpecError(
                f"model spec schema_version {version} is newer than this toolkit understands "
                f"({SCHEMA_VERSION}); upgrade unet-edge"
            )
        if version < 1:
            raise SpecError(f"model spec schema_version {version} is not valid")
        try:
            pre = _build(Preprocess, d.get("preprocess", {}), "preprocess")
            pre = replace(pre, window=tuple(float(v) for v in pre.window), size=tuple(int(v) for v in pre.size))
            io = _build(IOLayout, d.get("io", {}), "io")
            top = {k: v for k, v in d.items() if k not in ("preprocess", "io")}
            unknown = set(top) - {f.name for f in fields(cls)}
            if unknown:
                raise SpecError(f"model spec has unknown fields {sorted(unknown)}")
            spec = cls(**{**top, "preprocess": pre, "io": io, "classes": tuple(top.get("classes", CLASS_NAMES))})
        except (TypeError, ValueError) as exc:
            raise SpecError(f"malformed model spec: {exc}") from exc
        return spec.validate()

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelSpec:
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SpecError(f"model spec is not valid JSON: {exc}") from exc
        return cls.from_dict(d)


def _build(kind: type, d: Any, where: str):
    if not isinstance(d, dict):
        raise SpecError(f"model spec field '{where}' must be an object")
    unknown = set(d) - {f.name for f in fields(kind)}
    if unknown:
        raise SpecError(f"model spec field '{where}' has unknown keys {sorted(unknown)}")
    return kind(**d)
