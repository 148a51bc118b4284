"""Triton client backend: inference on a Triton Inference Server, everything else stays local.

Reading, preprocessing, postprocessing and writing run here as for a local model; each batch
of slices is one request to the server (gRPC or HTTP). Several requests are in flight at once
(``in_flight`` worker threads, each with its own client) so that the server's dynamic batcher
has work to combine, from this client and from others. The spec comes from the server: the
model's config carries it as the parameter ``unet_edge.spec`` (``seg-export triton`` puts it
there), and the config's tensors must match it before any volume is read.

Failures are one line each: an unreachable server (after a bounded timeout), an unknown or
unready model, tensors that do not match the spec, and a server that stops answering
mid-volume (the volume fails before anything is written; a batch run goes on to the next).
"""

from __future__ import annotations

import threading

import numpy as np

from ..errors import SegError, SpecError, first_line, require
from ..spec import METADATA_KEY, ModelSpec
from .base import PooledBackend

PROTOCOLS = ("grpc", "http")


class TritonError(SegError):
    """The Triton server cannot be used (unreachable, no such model, mismatched tensors, gone)."""


def _reason(exc: BaseException) -> str:
    """The first line of a client exception, without the gRPC status noise."""
    msg = getattr(exc, "message", None)
    return first_line((msg() if callable(msg) else None) or exc, 200)


def split_url(url: str, protocol: str) -> tuple[str, str]:
    """('host:port', protocol) from 'host:port' or 'grpc://host:port' / 'http://host:port'."""
    if "://" in url:
        scheme, url = url.split("://", 1)
        if scheme not in PROTOCOLS:
            raise TritonError(f"--url {scheme}://{url}: use host:port (or grpc://host:port, http://host:port)")
        protocol = scheme
    url = url.rstrip("/")
    host, _, port = url.rpartition(":")
    if not host or not port.isdigit():
        raise TritonError(f"--url {url!r} is not host:port (e.g. 127.0.0.1:8001 for gRPC, :8000 for HTTP)")
    return url, protocol


class TritonBackend(PooledBackend):
    name = "triton"

    def __init__(
        self,
        url: str,
        model_name: str,
        protocol: str = "grpc",
        timeout: float = 10.0,
        infer_timeout: float = 300.0,
        in_flight: int = 4,
        model_version: str = "",
    ):
        super().__init__()
        if protocol not in PROTOCOLS:
            raise TritonError(f"unknown protocol {protocol!r}; choose grpc or http")
        self.url, self.protocol = split_url(url, protocol)
        self.model_name = model_name
        self.model_version = model_version
        self.timeout, self.infer_timeout = timeout, infer_timeout
        self.in_flight = max(1, in_flight)
        self.server_config: dict = {}
        self._local = threading.local()
        self._clients: list = []
        self._lock = threading.Lock()

    # clients -----------------------------------------------------------------------------
    def _module(self):
        return require(f"tritonclient.{self.protocol}", "triton", "the Triton backend")

    def _new_client(self):
        mod = self._module()
        if self.protocol == "grpc":
            client = mod.InferenceServerClient(self.url)
        else:
            client = mod.InferenceServerClient(
                self.url, connection_timeout=self.timeout, network_timeout=self.infer_timeout
            )
        with self._lock:
            self._clients.append(client)
        return client

    def _client(self):
        """This thread's client (an HTTP client is not shared between threads)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._new_client()
        return client

    def _call(self, what: str, fn, *args, **kwargs):
        """A control call with the bounded timeout; any failure reads as an unreachable server."""
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise TritonError(
                f"cannot reach the Triton server at {self.url} over {self.protocol} ({what}: {_reason(exc)}); "
                "check --url and --protocol, and that the server is running"
            ) from exc

    # the lifecycle -----------------------------------------------------------------------
    def activate_impl(self) -> None:
        try:
            self._open()
        except BaseException:
            self.release_impl()
            raise

    def _open(self) -> None:
        client = self._client()
        if not self._call("health", client.is_server_live):
            raise TritonError(f"the Triton server at {self.url} is not live yet; retry when it is ready")
        if not self._call("model readiness", client.is_model_ready, self.model_name, self.model_version):
            ready = self._ready_models(client)
            raise TritonError(
                f"the Triton server at {self.url} has no ready model {self.model_name!r} "
                f"(ready: {', '.join(ready) if ready else 'none'}); check --model-name, or the server log "
                "if the model failed to load"
            )
        cfg = self._call("model config", client.get_model_config, self.model_name, self.model_version, **self._json())
        cfg = cfg.get("config", cfg)  # gRPC's JSON wraps the config
        self.server_config = cfg
        self.spec = self._spec_from(cfg)
        self._check_tensors(cfg)
        self.max_batch = int(cfg.get("max_batch_size", 0))
        preferred = [int(b) for b in (cfg.get("dynamic_batching") or {}).get("preferred_batch_size", [])]
        self.default_batch = min([4, self.max_batch, *preferred[:1]])
        self.provider = f"{self.protocol}://{self.url}/{self.model_name}"
        self.start_pool(self.in_flight, "triton-request")

    def _json(self) -> dict:
        return {"as_json": True} if self.protocol == "grpc" else {}

    def _ready_models(self, client) -> list[str]:
        try:
            index = client.get_model_repository_index(**self._json())
        except Exception:
            return []
        models = index.get("models", []) if isinstance(index, dict) else index
        return sorted(m["name"] for m in models if m.get("state", "READY") == "READY")

    def _spec_from(self, cfg: dict) -> ModelSpec:
        text = ((cfg.get("parameters") or {}).get(METADATA_KEY) or {}).get("string_value")
        if not text:
            raise SpecError(
                f"model {self.model_name!r} on {self.url} carries no {METADATA_KEY} parameter, so its preprocessing "
                "is unknown; serve a repository written by 'seg-export triton MODEL -o REPO'"
            )
        return ModelSpec.from_json(text)

    def _check_tensors(self, cfg: dict) -> None:
        """The served model's tensors must be the spec's: names, FP32, C,H,W in and K,H,W out, batched."""
        spec, problems = self.spec, []
        pre = spec.preprocess
        want_in = [pre.channels, *pre.size]
        want_out = [spec.out_channels, *pre.size]
        if int(cfg.get("max_batch_size", 0)) < 1:
            problems.append("max_batch_size 0 (the model does not batch)")
        for kind, tensors, name, dims in (
            ("input", cfg.get("input", []), spec.io.input_name, want_in),
            ("output", cfg.get("output", []), spec.io.output_name, want_out),
        ):
            found = {t["name"]: t for t in tensors}
            if name not in found or (kind == "input" and len(tensors) != 1):
                problems.append(f"{kind}s {sorted(found)} (spec: ['{name}'])")
                continue
            t = found[name]
            got = [int(d) for d in t.get("dims", [])]
            if got != dims:
                problems.append(f"{kind} {name} dims {got} (spec: {dims})")
            if t.get("data_type") != "TYPE_FP32":
                problems.append(f"{kind} {name} type {t.get('data_type')} (spec: TYPE_FP32)")
        if problems:
            raise TritonError(
                f"model {self.model_name!r} on {self.url} does not match its spec: " + "; ".join(problems) + "; "
                "re-export the repository with seg-export triton"
            )

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        mod = self._module()
        client = self._client()
        inp = mod.InferInput(self.spec.io.input_name, list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        out = mod.InferRequestedOutput(self.spec.io.output_name)
        kwargs = {"client_timeout": self.infer_timeout} if self.protocol == "grpc" else {}
        try:
            result = client.infer(self.model_name, [inp], self.model_version, outputs=[out], **kwargs)
            logits = result.as_numpy(self.spec.io.output_name)
        except Exception as exc:
            raise TritonError(
                f"the Triton server at {self.url} failed a request mid-volume ({_reason(exc)}); nothing was written "
                "for this volume"
            ) from exc
        want = (batch.shape[0], self.spec.out_channels, *batch.shape[2:])
        if logits is None or tuple(logits.shape) != want:
            got = None if logits is None else tuple(logits.shape)
            raise TritonError(f"model {self.model_name!r} on {self.url} returned logits of shape {got}, not {want}")
        return logits

    def release_impl(self) -> None:
        self.stop_pool()
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            try:
                c.close()
            except Exception:
                pass
        self._local = threading.local()

    def details(self) -> list[str]:
        platform = self.server_config.get("platform") or self.server_config.get("backend") or ""
        return [x for x in (platform, f"{self.in_flight} requests in flight", f"max batch {self.max_batch}") if x]
