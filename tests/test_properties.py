"""Property-based tests (hypothesis) and fuzzing of the spec and adapter readers."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import capaboost_fx as cbx
from capaboost_fx.masks import make_masks

SLOW = settings(max_examples=12, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def layer_specs(draw):
    in_f = draw(st.integers(2, 40))
    out_f = draw(st.integers(2, 40))
    r = draw(st.integers(1, min(in_f, out_f, 8)))
    d = draw(st.integers(1, 4))
    density = draw(st.sampled_from([0.1, 0.25, 0.3, 0.5, 0.7, 1.0]))
    seed = draw(st.integers(0, 2**31))
    return in_f, out_f, r, d, density, seed


def _transformed(in_f, out_f, r, d, density, seed):
    torch.manual_seed(seed % 1000)
    model = nn.Sequential(nn.Linear(in_f, out_f), nn.Tanh(), nn.Linear(out_f, 3)).double()
    spec = cbx.Spec(targets=["0"], rank=r, num_masks=d, density=density, seed=seed)
    tm = cbx.transform(model, spec, (torch.randn(3, in_f, dtype=torch.float64),)).eval()
    with torch.no_grad():
        a = cbx.adapters(tm)["0"]
        a.A.normal_()
        a.B.normal_()
    return model, tm


@SLOW
@given(layer_specs())
def test_fold_equals_unfolded_float64(p) -> None:
    model, tm = _transformed(*p)
    x = torch.randn(5, p[0], dtype=torch.float64)
    torch.testing.assert_close(cbx.fold(tm)(x), tm(x), rtol=1e-10, atol=1e-10)
    assert torch.equal(cbx.fold(tm).get_base_model()[2].weight, model[2].weight)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 50), st.integers(1, 50), st.integers(1, 4),
       st.floats(0.01, 1.0, allow_nan=False), st.integers(0, 2**40))
def test_each_mask_keeps_exactly_floor_numel_density(rows, cols, d, density, seed) -> None:
    m = make_masks("random", (rows, cols), d, density, seed, "t", "A")
    expect = rows * cols if density >= 1.0 else max(1, int(rows * cols * density + 1e-9))
    assert [int(m[i].sum()) for i in range(d)] == [expect] * d


@settings(max_examples=40, deadline=None)
@given(layer_specs())
def test_rank_bound_and_equality(p) -> None:
    in_f, out_f, r, d, density, seed = p
    a = cbx.CapaBoostAdapter(cbx.AdapterSite(in_f, out_f, name="t"),
                             cbx.Spec(targets=["t"], rank=r, num_masks=d, density=density,
                                      alpha=r, seed=seed), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        a.A.copy_(torch.randn(a.A.shape, generator=gen, dtype=torch.float64))
        a.B.copy_(torch.randn(a.B.shape, generator=gen, dtype=torch.float64))
    rank = torch.linalg.matrix_rank(a.delta_weight(torch.float64)).item()
    bound = min(d * r, in_f, out_f) if density < 1.0 else min(r, in_f, out_f)
    assert rank <= bound
    # Equality needs enough kept entries per row and column for the masks to be generic.
    if min(in_f, out_f) >= 16 and 0.3 <= density <= 0.7:
        assert rank == bound


@SLOW
@given(layer_specs())
def test_save_load_round_trip_exact(p) -> None:
    model, tm = _transformed(*p)
    with tempfile.TemporaryDirectory() as tmp:
        path = cbx.save_adapter(tm, os.path.join(tmp, "a.safetensors"))
        loaded = cbx.load_adapter(model, path, (torch.randn(3, p[0], dtype=torch.float64),))
    x = torch.randn(4, p[0], dtype=torch.float64)
    assert torch.equal(loaded.eval()(x), tm(x))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
spec_keys = st.sampled_from(["targets", "exclude", "rank", "num_masks", "density", "alpha",
                             "dropout", "mask", "seed", "trainable", "bogus"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.dictionaries(spec_keys, json_values, max_size=8)))
def test_spec_from_dict_raises_only_library_errors(doc) -> None:
    try:
        spec = cbx.Spec.from_dict(doc)
    except cbx.CapaBoostError:
        return
    # Whatever was accepted is a valid spec that round-trips.
    assert cbx.Spec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    x = (torch.randn(3, 6),)
    tm = cbx.transform(model, cbx.Spec(targets=["0", "2"], rank=2, trainable=["2.bias"]), x)
    path = cbx.save_adapter(tm, tmp_path_factory.mktemp("a") / "a.safetensors")
    return model, x, path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture])
@given(st.data())
def test_load_adapter_on_damaged_bytes_raises_only_library_errors(saved, data) -> None:
    model, x, good = saved
    kind = data.draw(st.sampled_from(["random", "flip", "truncate", "splice"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=600))
    elif kind == "flip":
        pos = data.draw(st.lists(st.integers(0, len(good) - 1), min_size=1, max_size=4))
        blob = bytearray(good)
        for i in pos:
            blob[i] ^= data.draw(st.integers(1, 255))
        blob = bytes(blob)
    elif kind == "truncate":
        blob = good[: data.draw(st.integers(0, len(good) - 1))]
    else:
        blob = good[:8] + data.draw(st.binary(max_size=200)) + good[8:]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "a.safetensors")
        with open(path, "wb") as f:
            f.write(blob)
        try:
            cbx.load_adapter(model, path, x)
        except cbx.CapaBoostError:
            pass
