"""Two processes, gloo on CPU: DistributedDataParallel trains one model."""

from __future__ import annotations

import socket

import pytest

torch = pytest.importorskip("torch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from tests.conftest import TINY
    from train.config import TrainConfig
    from train.loop import fit

    cfg = TrainConfig(**{**TINY, "base_width": 4, "batch_size": 2}, epochs=1, steps_per_epoch=2, val_every=100)
    result = fit(data, out, cfg, log=lambda *a: None)
    # parameters only: rank 0 alone validates, which re-estimates its BatchNorm buffers
    torch.save({k: v.detach().clone() for k, v in result["model"].named_parameters()}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_ranks_end_with_identical_weights(tiny_data, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tiny_data / "train"), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    from train.config import TrainConfig
    from train.model import UNet

    torch.manual_seed(0)
    from tests.conftest import TINY

    initial = dict(UNet(**TrainConfig(**{**TINY, "base_width": 4}).spec({}).model).named_parameters())
    changed = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k])
        if not torch.allclose(a[k], initial[k]):
            changed += 1
    assert changed > 10  # the step moved the weights, identically on both ranks
    # rank 0 alone wrote the run files, each once and atomically (no temporary leftovers)
    written = {p.name for p in tmp_path.iterdir()} - {"rank0.pt", "rank1.pt"}
    assert written == {"last.pt", "best.pt", "metrics.jsonl", "curves.png", "split.json", "config.json"}
