"""Spec.init ("standard" | "official") and Spec.scaling ("paper" | "normalized"), checked against
references written here: the update as d separate masked copies, the official code's own
construction of A, and the expectation of ΔW over masks."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

import capaboost_fx as cbx
from capaboost_fx.adapter import AdapterSite, CapaBoostAdapter
from capaboost_fx.spec import Spec

ALPHA = 16.0


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 8)).double().eval()


X = torch.randn(3, 24, dtype=torch.float64)

# (rank, d, density, scaling, expected s): alpha/r, or alpha/(r·d·ρ²), written out.
SCALES = [
    (4, 2, 0.5, "paper", ALPHA / 4),
    (4, 2, 0.5, "normalized", ALPHA / (4 * 2 * 0.25)),
    (4, 4, 0.5, "normalized", ALPHA / (4 * 4 * 0.25)),  # d·ρ² = 1: the paper's s again
    (4, 3, 0.25, "normalized", ALPHA / (4 * 3 * 0.0625)),
    (8, 1, 1.0, "normalized", ALPHA / 8),  # plain LoRA: both rules agree
]


@pytest.mark.parametrize("rank,d,density,scaling,expected", SCALES)
def test_scale_and_delta_weight_match_d_masked_copies(rank, d, density, scaling, expected) -> None:
    spec = cbx.Spec(targets=["0", "2"], rank=rank, num_masks=d, density=density, alpha=ALPHA,
                    scaling=scaling)
    assert spec.scale == pytest.approx(expected)
    tm = cbx.transform(_mlp(), spec, (X,)).eval()
    deltas = cbx.delta_weights(tm)
    for name, a in cbx.adapters(tm).items():
        with torch.no_grad():  # non-zero B, so the comparison cannot pass by accident
            a.B.normal_()
        assert a.scaling == pytest.approx(expected)
        ref = sum((a.B * a.mask_B[i]) @ (a.A * a.mask_A[i]) for i in range(d)) * expected
        torch.testing.assert_close(cbx.delta_weights(tm)[name].double(), ref, rtol=1e-6,
                                   atol=1e-7)
    assert deltas  # both targets adapted
    torch.testing.assert_close(cbx.fold(tm)(X), tm(X), rtol=1e-10, atol=1e-10)


def test_normalized_scaling_gives_lora_s_expected_update() -> None:
    """Averaged over mask draws, the normalized CapaBoost update equals LoRA's (alpha/r)·BA;
    the paper's scaling gives d·ρ² times that."""
    gen = torch.Generator().manual_seed(0)
    rank, d, density, n_in, n_out = 4, 2, 0.5, 10, 6  # even sizes: random masks keep exactly ρ
    A, B = torch.randn(rank, n_in, generator=gen), torch.randn(n_out, rank, generator=gen)
    lora = ALPHA / rank * (B @ A)
    means = {}
    for rule in ("normalized", "paper"):
        total = torch.zeros(n_out, n_in)
        draws = 3000
        for seed in range(draws):
            a = CapaBoostAdapter(AdapterSite(n_in, n_out, name="t"),
                                 Spec(targets=["t"], rank=rank, num_masks=d, density=density,
                                      alpha=ALPHA, seed=seed, scaling=rule))
            with torch.no_grad():
                a.A.copy_(A)
                a.B.copy_(B)
            total += a.delta_weight()
        means[rule] = total / draws
    err = (means["normalized"] - lora).norm() / lora.norm()
    assert err < 0.05, err
    torch.testing.assert_close(means["paper"], means["normalized"] * d * density**2)


def test_official_init_is_the_official_codes_distribution() -> None:
    """The official code: lora_A = nn.Linear(r, in).weight (in × r, fan-in r), then
    kaiming_uniform_(a=√5), which is U(±1/√r); B starts at zero."""
    rank, n_in = 4, 3000
    site = AdapterSite(n_in, 16, name="t")
    spec = Spec(targets=["t"], rank=rank, num_masks=2, density=0.5, alpha=ALPHA)
    a = CapaBoostAdapter(site, dataclasses.replace(spec, init="official"))
    official = nn.Linear(rank, n_in, bias=False)
    nn.init.kaiming_uniform_(official.weight, a=math.sqrt(5),
                             generator=torch.Generator().manual_seed(1))
    ours, ref = a.A.detach().flatten().sort().values, official.weight.T.flatten().sort().values
    bound = 1 / math.sqrt(rank)
    assert ours.abs().max() <= bound and ref.abs().max() <= bound
    q = torch.linspace(0, 1, 21)
    torch.testing.assert_close(ours.quantile(q), ref.quantile(q), atol=0.03 * bound, rtol=0)
    assert not a.B.any()
    std = CapaBoostAdapter(site, spec)  # the default
    assert std.init == "standard" and std.A.abs().max() <= 1 / math.sqrt(n_in)
    assert std.A.abs().max() > 0.9 / math.sqrt(n_in)


def test_spec_fields_validate_round_trip_and_override_per_target() -> None:
    for bad, text in ((dict(init="xavier"), "init"), (dict(scaling="sqrt"), "scaling"),
                      (dict(init="official", method="padapter", activation="relu"),
                       "padapter")):
        with pytest.raises(cbx.SpecError, match=text):
            cbx.Spec(targets=["0"], **bad)
    with pytest.raises(cbx.SpecError, match=r"overrides\['2'\].*scaling"):
        cbx.Spec(targets=["0"], overrides={"2": {"scaling": "unit"}})
    spec = cbx.Spec(targets=["0", "2"], rank=4, num_masks=2, density=0.5, alpha=ALPHA,
                    overrides={"2": {"init": "official", "scaling": "normalized"}})
    assert cbx.Spec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.to_dict()["init"] == "standard" and spec.to_dict()["scaling"] == "paper"
    tm = cbx.transform(_mlp(), spec, (X,))
    first, last = cbx.adapters(tm)["0"], cbx.adapters(tm)["2"]
    assert (first.init, first.scaling) == ("standard", ALPHA / 4)
    assert (last.init, last.scaling) == ("official", ALPHA / (4 * 2 * 0.25))
    assert first.A.abs().max() <= 1 / math.sqrt(24)  # standard: U(±1/√in)
    assert last.A.abs().max() > 1 / math.sqrt(32)  # official: U(±1/√r), r = 4


def test_saved_adapter_keeps_init_and_scaling(tmp_path) -> None:
    spec = cbx.Spec(targets=["0"], rank=4, num_masks=2, density=0.5, alpha=ALPHA,
                    init="official", scaling="normalized")
    model = _mlp()
    tm = cbx.transform(model, spec, (X,))
    with torch.no_grad():
        cbx.adapters(tm)["0"].B.normal_()
    path = cbx.save_adapter(tm, tmp_path / "a.safetensors")
    again = cbx.load_adapter(model, path, (X,))
    assert cbx.adapters(again)["0"].scaling == ALPHA / (4 * 2 * 0.25)
    torch.testing.assert_close(cbx.delta_weights(again)["0"], cbx.delta_weights(tm)["0"])
