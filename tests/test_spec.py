import json

import pytest

from runtime.errors import SpecError
from runtime.spec import SCHEMA_VERSION, ModelSpec, Preprocess


def demo_spec(**kw):
    return ModelSpec(
        model=dict(in_channels=3, classes=3, base_width=16, depth=4, norm="batch", bilinear=False), **kw
    ).validate()


def test_round_trip_json_preserves_every_field():
    spec = demo_spec(provenance={"seed": 0}, calibration={"method": "entropy"}, precision="int8")
    back = ModelSpec.from_json(spec.to_json())
    assert back == spec
    assert back.preprocess.window == (-200.0, 250.0) and isinstance(back.preprocess.size, tuple)
    assert json.loads(spec.to_json())["schema_version"] == SCHEMA_VERSION


def test_newer_schema_is_refused_with_upgrade_hint():
    d = demo_spec().to_dict()
    d["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(SpecError, match="newer.*upgrade"):
        ModelSpec.from_dict(d)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.pop("schema_version"), "schema_version"),
        (lambda d: d["preprocess"].update(window=[100, -100]), "window"),
        (lambda d: d["preprocess"].update(mode="zoom"), "mode"),
        (lambda d: d["preprocess"].update(bogus=1), "unknown"),
        (lambda d: d.update(extra=1), "unknown"),
        (lambda d: d["model"].update(in_channels=1), "in_channels"),
        (lambda d: d["io"].update(activation="relu"), "activation"),
        (lambda d: d.update(classes=["liver", "tumor"]), "background"),
    ],
)
def test_malformed_specs_are_clear_errors(mutate, match):
    d = demo_spec().to_dict()
    mutate(d)
    with pytest.raises(SpecError, match=match):
        ModelSpec.from_dict(d)


def test_not_json_is_a_spec_error():
    with pytest.raises(SpecError, match="JSON"):
        ModelSpec.from_json("{not json")


def test_channels_follow_context():
    assert Preprocess(context=2).channels == 5
    assert (
        ModelSpec(io=ModelSpec().io.__class__(activation="sigmoid"), classes=("background", "liver")).out_channels == 1
    )
