"""seg-train: learning, resume, the spec/preprocessing contract and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from runtime.errors import InputError, SpecError  # noqa: E402
from tests.conftest import TINY, run_main  # noqa: E402
from train.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from train.cli import cli  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.loop import evaluate_cases, fit, read_log  # noqa: E402
from train.model import UNet  # noqa: E402


def test_unet_rebuilds_from_its_config_and_names_valid_sizes():
    net = UNet(in_channels=3, classes=3, base_width=4, depth=3, norm="group", bilinear=True)
    again = UNet(**net.config)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in net.parameters())
    assert net(torch.zeros(1, 3, 32, 48)).shape == (1, 3, 32, 48)
    with pytest.raises(ValueError, match="use 64x48"):
        net.check_input_size(60, 50)


def test_a_tiny_model_learns_what_an_untrained_one_cannot(tiny_run, tiny_data):
    out, cfg = tiny_run
    log = read_log(out / "metrics.jsonl")
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["train_loss"] < 0.8 * log[0]["train_loss"]
    best = load_checkpoint(out / "best.pt")
    trained = max(r["val_liver_dice"] for r in log)
    assert trained >= 0.5
    from runtime.datasets import load_dataset

    val = [c for c in load_dataset(tiny_data / "train") if c.name in best.spec.provenance["val_cases"]]
    torch.manual_seed(123)
    untrained = evaluate_cases(UNet(**best.spec.model), best.spec, val, torch.device("cpu"))
    assert max(m["liver"]["dice"] or 0 for m in untrained.values()) < 0.3 < trained
    assert (out / "curves.png").stat().st_size > 5000
    # eval mode (running BatchNorm statistics) agrees with train mode (batch statistics) after the
    # re-estimation on whole slices: a short run does not collapse in eval mode
    assert all(r["bn_agree_after"] > 0.9 for r in log if r.get("bn_agree_after") is not None)
    assert best.spec.provenance["val_score"] == pytest.approx(max(r["val_score"] for r in log))
    split = json.loads((out / "split.json").read_text())
    assert set(split["validation"]).isdisjoint(split["train"])


def test_resume_continues_the_log_and_matches_an_uninterrupted_run(tiny_data, tmp_path):
    cfg = dict(TINY, steps_per_epoch=4, val_every=1, patience=10)

    def interrupt_after_epoch_2(msg):  # like Ctrl-C once epoch 2 is checkpointed
        if msg.startswith("epoch 2:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_data / "train", tmp_path / "a", TrainConfig(**cfg, epochs=3), log=interrupt_after_epoch_2)
    assert load_checkpoint(tmp_path / "a" / "last.pt").extra["epoch"] == 2
    fit(tiny_data / "train", tmp_path / "a", TrainConfig(**cfg, epochs=3), resume=True, log=lambda *a: None)
    fit(tiny_data / "train", tmp_path / "b", TrainConfig(**cfg, epochs=3), log=lambda *a: None)
    assert [r["epoch"] for r in read_log(tmp_path / "a" / "metrics.jsonl")] == [1, 2, 3]
    before = (tmp_path / "a" / "last.pt").read_bytes()
    with pytest.raises(InputError, match="was validated on volume-2; resume with the same --seed, --split-seed"):
        fit(
            tiny_data / "train",
            tmp_path / "a",
            TrainConfig(**cfg, epochs=4, split_seed=1),
            resume=True,
            log=lambda *a: None,
        )
    assert (tmp_path / "a" / "last.pt").read_bytes() == before
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a.extra["epoch"] == b.extra["epoch"] == 3
    for k in a.state_dict:
        torch.testing.assert_close(a.state_dict[k], b.state_dict[k], rtol=1e-5, atol=1e-6)


def test_checkpoint_spec_reproduces_training_preprocessing_without_torch(tiny_run, tiny_data, tmp_path):
    """The runtime, given only the checkpoint's spec JSON and no torch, builds exactly the
    model input that training fed the network for the same slice."""
    from runtime.datasets import load_dataset
    from train.data import SliceDataset, SliceSampler, index_cases

    out, _ = tiny_run
    ck = load_checkpoint(out / "best.pt")
    (tmp_path / "spec.json").write_text(ck.spec.to_json())
    case = load_dataset(tiny_data / "train")[0]
    ds = SliceDataset([case], ck.spec.preprocess, SliceSampler(index_cases([case]), 0), 1, None, 0)
    train_x, _ = ds.sample(0, 7)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from runtime.spec import ModelSpec\nfrom runtime.io import read_volume\nfrom runtime.preprocess import "
        "make_batch\n"
        f"spec = ModelSpec.from_json(open({str(tmp_path / 'spec.json')!r}).read())\n"
        f"v = read_volume({str(case.image)!r})\n"
        f"np.save({str(tmp_path / 'rt.npy')!r}, make_batch(v.data, v.spacing, spec.preprocess, 7, 8)[0])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "rt.npy"), train_x)


def _one_line_error(code, out, needle):
    assert code == 2, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("seg-train: error:") and needle in lines[0], out


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, tiny_data, capsys):
    tiny = ["--size", "64", "--spacing-mm", "6", "--base-width", "4", "--workers", "0", "--crop", "0"]

    def fit_cli(data, out, *extra):
        return run_main(cli, ["fit", data, "--out", out, *tiny, *extra], capsys, "seg-train")

    (tmp_path / "empty").mkdir()
    _one_line_error(*fit_cli(tmp_path / "empty", tmp_path / "o1"), "no labelled cases")
    from runtime.phantoms import make_phantom, write_phantoms

    write_phantoms(tmp_path / "one", 1, seed=1, size=64, slices=16, progress=False)
    _one_line_error(*fit_cli(tmp_path / "one", tmp_path / "o2"), "need at least 2 cases")
    # mislabeled: a label volume with a class the toolkit does not know
    write_phantoms(tmp_path / "mislabeled", 2, seed=1, size=64, slices=16, progress=False)
    import nibabel as nib

    ph = make_phantom(1, 1, size=64, slices=16)
    lab = ph.labels.copy()
    lab[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(lab, ph.affine), str(tmp_path / "mislabeled" / "segmentation-1.nii.gz"))
    _one_line_error(*fit_cli(tmp_path / "mislabeled", tmp_path / "o3"), "not classes 0..2")
    _one_line_error(*fit_cli(tiny_data / "train", tmp_path / "o4", "--size", "60"), "use 64x64")
    _one_line_error(*fit_cli(tiny_data / "train", tmp_path / "o5", "--crop", "36"), "use 32x32")
    (tmp_path / "afile").write_text("x")
    _one_line_error(*fit_cli(tiny_data / "train", tmp_path / "afile" / "run"), "cannot write the run directory")
    _one_line_error(*fit_cli(tiny_data / "train", tmp_path / "o6", "--resume"), "nothing to resume")
    (tmp_path / "cfg.json").write_text('{"epochs": 2, "widht": 4}')
    _one_line_error(
        *fit_cli(tiny_data / "train", tmp_path / "o7", "--config", tmp_path / "cfg.json"), "unknown config keys"
    )
    # nothing was written for any of them (the unwritable case never got a directory)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 truncated zip")
    _one_line_error(
        *run_main(cli, ["evaluate", tmp_path / "bad.pt", tiny_data / "heldout"], capsys, "seg-train"),
        "not a readable checkpoint",
    )
    spec = TrainConfig(base_width=4, depth=2, size=32).spec({})
    save_checkpoint(tmp_path / "new.pt", UNet(**spec.model), spec)
    obj = torch.load(tmp_path / "new.pt", weights_only=True)
    obj["spec"] = obj["spec"].replace('"schema_version": 1', '"schema_version": 99')
    torch.save(obj, tmp_path / "new.pt")
    _one_line_error(
        *run_main(
            cli,
            ["evaluate", tmp_path / "new.pt", tiny_data / "heldout", "--out", tmp_path / "m.json"],
            capsys,
            "seg-train",
        ),
        "newer than this toolkit",
    )
    assert not (tmp_path / "m.json").exists()


def test_cli_resume_with_more_epochs_continues_the_run(tiny_data, tmp_path, capsys):
    """--epochs 2, then --epochs 3 --resume: epochs 1, 2, 3 once each; --config keys, flags override."""
    (tmp_path / "cfg.json").write_text(
        json.dumps({**TINY, "base_width": 4, "epochs": 9, "steps_per_epoch": 2, "bn_slices": 16})
    )
    args = ["fit", tiny_data / "train", "--out", tmp_path / "run", "--config", tmp_path / "cfg.json"]
    code, out = run_main(cli, [*args, "--epochs", "2"], capsys, "seg-train")
    assert code == 0, out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 2
    _one_line_error(*run_main(cli, [*args, "--epochs", "3"], capsys, "seg-train"), "already holds a run")
    code, out = run_main(cli, [*args, "--epochs", "3", "--resume"], capsys, "seg-train")
    assert code == 0 and "resuming after epoch 2" in out, out
    assert [r["epoch"] for r in read_log(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last.extra["epoch"] == 3 and last.spec.provenance["epochs"] == 3
    assert set(last.extra["rng"]) >= {"torch", "numpy", "python"} and "optimizer" in last.extra


def test_checkpoint_from_a_newer_spec_version_is_refused(tmp_path):
    spec = TrainConfig(base_width=4, depth=2, size=32).spec({})
    save_checkpoint(tmp_path / "c.pt", UNet(**spec.model), spec)
    obj = torch.load(tmp_path / "c.pt", weights_only=True)
    d = json.loads(obj["spec"])
    d["schema_version"] = 99
    obj["spec"] = json.dumps(d)
    torch.save(obj, tmp_path / "c.pt")
    with pytest.raises(SpecError, match="newer than this toolkit"):
        load_checkpoint(tmp_path / "c.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a seg-train checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_evaluate_writes_per_case_and_global_json(tiny_run, tiny_data, tmp_path, capsys):
    out, _ = tiny_run
    code, text = run_main(
        cli, ["evaluate", out / "best.pt", tiny_data / "heldout", "--out", tmp_path / "m.json"], capsys, "seg-train"
    )
    assert code == 0, text
    assert "global (pooled)" in text and "volume-50" in text
    m = json.loads((tmp_path / "m.json").read_text())
    assert set(m["per_case"]) == {"volume-50", "volume-51"}
    assert m["summary"]["liver"]["dice_global"] is not None
    code, text = run_main(
        cli,
        ["evaluate", out / "best.pt", tiny_data / "heldout", "--out", tmp_path / "big.json", "--min-tumour-ml", "1e6"],
        capsys,
        "seg-train",
    )
    big = json.loads((tmp_path / "big.json").read_text())
    assert code == 0 and big["min_tumour_ml"] == 1e6 and m["min_tumour_ml"] == 0
    for name, case in big["per_case"].items():  # every tumour component is under 1 L: all become liver
        assert case["tumor"]["pred_voxels"] == 0
        assert case["liver"]["pred_voxels"] == m["per_case"][name]["liver"]["pred_voxels"]


def test_compare_pairs_evaluate_files_by_case(tiny_run, tiny_data, tmp_path, capsys):
    """seg-train compare reads what seg-train evaluate writes; a run that is better on every case shows it."""
    out, _ = tiny_run
    code, text = run_main(
        cli, ["evaluate", out / "best.pt", tiny_data / "heldout", "--out", tmp_path / "a.json"], capsys, "seg-train"
    )
    assert code == 0, text
    a = json.loads((tmp_path / "a.json").read_text())
    for m in a["per_case"].values():
        m["liver"]["dice"] = (m["liver"]["dice"] + 1) / 2  # halfway to perfect on every case
    (tmp_path / "b.json").write_text(json.dumps(a))
    code, text = run_main(
        cli,
        ["compare", tmp_path / "a.json", tmp_path / "b.json", "--structure", "liver", "--out", tmp_path / "c.json"],
        capsys,
        "seg-train",
    )
    assert code == 0, text
    assert "better on 2, worse on 0" in text and "volume-50" in text and "mean of 2" in text
    c = json.loads((tmp_path / "c.json").read_text())["comparisons"][str(tmp_path / "b.json")]
    assert c["mean_diff"] > 0 and c["ci95"][0] > 0
    (tmp_path / "cfg.json").write_text('{"epochs": 2}')
    _one_line_error(
        *run_main(cli, ["compare", tmp_path / "a.json", tmp_path / "cfg.json"], capsys, "seg-train"),
        "not a metrics file of seg-train evaluate",
    )
    _one_line_error(
        *run_main(cli, ["compare", tmp_path / "a.json", tmp_path / "gone.json"], capsys, "seg-train"), "no such file"
    )


def test_weight_ema_warms_up_then_averages():
    from train.loop import ema_model

    net = torch.nn.Linear(2, 1, bias=False)
    assert ema_model(net, 0.0) is None
    ema = ema_model(net, 0.99)
    w0 = net.weight.detach().clone()
    ema.update_parameters(net)  # the first update copies
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update_parameters(net)  # decay min(0.99, (1 + 1) / (10 + 1)) while warming up
    d = 2 / 11
    assert torch.allclose(ema.module.weight, d * w0 + (1 - d) * (w0 + 1))
    assert not torch.allclose(ema.module.weight, net.weight)


def test_amp_resolves_per_device_and_refuses_what_cannot_run(monkeypatch):
    import train.loop as loop

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loop.amp_dtype("off", cpu) is None and loop.amp_dtype("off", cuda) is None
    assert loop.amp_dtype("auto", cuda) is torch.float16 and loop.amp_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: True)
    assert loop.amp_dtype("auto", cpu) is None  # bf16 only when asked for: it cost tumour Dice on the CPU
    with pytest.raises(InputError, match="--amp fp16 needs a CUDA device"):
        loop.amp_dtype("fp16", cpu)
    with pytest.raises(InputError, match="--amp bf16 needs a CUDA device or the CPU"):
        loop.amp_dtype("bf16", torch.device("mps"))
    assert loop.amp_dtype("auto", torch.device("mps")) is None


def test_bf16_mixed_precision_learns_and_keeps_float32_weights(tiny_data, tmp_path):
    cfg = TrainConfig(**{**TINY, "amp": "bf16"}, epochs=6, steps_per_epoch=20, val_every=1, patience=10, lr=3e-3)
    fit(tiny_data / "train", tmp_path, cfg, log=lambda *a: None)
    log = read_log(tmp_path / "metrics.jsonl")
    assert log[-1]["train_loss"] < 0.8 * log[0]["train_loss"]
    assert max(r["val_liver_dice"] for r in log) >= 0.5
    best = load_checkpoint(tmp_path / "best.pt")
    assert best.spec.provenance["amp"] == "bfloat16"
    assert all(v.dtype == torch.float32 for v in best.state_dict.values() if v.is_floating_point())
