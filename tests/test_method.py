"""Method breadth: mask kinds, the mask registry, per-target overrides."""

from __future__ import annotations

import pytest
import torch
from models import reference_delta
from torch import nn

import capaboost_fx as cbx
from capaboost_fx.masks import make_masks


def test_nm_pattern_holds_in_every_group_along_the_input_dim() -> None:
    for factor, shape in (("A", (8, 32)), ("B", (24, 8))):
        m = make_masks("2:4", shape, 3, 0.5, 0, "t", factor)
        groups = m.view(3, shape[0], shape[1] // 4, 4)  # groups run along dim 1
        assert torch.all(groups.sum(-1) == 2)
        assert not torch.equal(m[0], m[1])
    m = make_masks("1:8", (4, 64), 1, 0.125, 5, "t", "A")
    assert torch.all(m.view(4, 8, 8).sum(-1) == 1)


def test_nm_rank_gain_and_fold() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 4)).double()
    spec = cbx.Spec(targets=["0"], rank=4, num_masks=2, density=0.5, mask="2:4")
    x = torch.randn(3, 32, dtype=torch.float64)
    tm = cbx.transform(model, spec, (x,)).eval()
    a = cbx.adapters(tm)["0"]
    with torch.no_grad():
        a.A.normal_()
        a.B.normal_()
    assert torch.all(a.mask_A.view(2, 4, 8, 4).sum(-1) == 2)
    assert torch.all(a.mask_B.view(2, 48, 1, 4).sum(-1) == 2)
    assert torch.linalg.matrix_rank(reference_delta(cbx.adapters(tm)["0"])).item() == 8
    torch.testing.assert_close(cbx.fold(tm)(x), tm(x), rtol=1e-10, atol=1e-10)


def test_nm_needs_divisible_dims_and_matching_density() -> None:
    with pytest.raises(cbx.SpecError, match="density=0.25"):
        cbx.Spec(targets=["0"], mask="1:4", density=0.5)
    model = nn.Sequential(nn.Linear(30, 16))
    with pytest.raises(cbx.TargetError, match="divisible by 4"):
        cbx.transform(model, cbx.Spec(targets=["0"], rank=4, mask="2:4"), (torch.randn(2, 30),))


def test_bernoulli_density_and_seeds() -> None:
    m = make_masks("bernoulli", (64, 64), 2, 0.3, 1, "t", "A")
    frac = m.float().mean().item()
    assert 0.27 < frac < 0.33
    assert torch.equal(m, make_masks("bernoulli", (64, 64), 2, 0.3, 1, "t", "A"))
    assert not torch.equal(m, make_masks("bernoulli", (64, 64), 2, 0.3, 2, "t", "A"))


def test_registered_mask_function() -> None:
    def first_rows(shape, density, generator):
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[: max(1, int(shape[0] * density))] = True
        return mask

    with cbx.mask_scope({"first-rows-test": first_rows}):
        assert "first-rows-test" in cbx.mask_kinds()
        model = nn.Sequential(nn.Linear(8, 8))
        tm = cbx.transform(model, cbx.Spec(targets=["0"], rank=4, mask="first-rows-test"),
                           (torch.randn(2, 8),))
    assert "first-rows-test" not in cbx.mask_kinds()  # scoped: gone after the block
    a = cbx.adapters(tm)["0"]
    assert a.mask_A[:, :2].all() and not a.mask_A[:, 2:].any()
    with pytest.raises(cbx.SpecError, match="register_mask"):
        cbx.Spec(targets=["0"], mask="nope")


class TwoPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x))


def test_overrides_resolve_in_order_and_show_in_inspect() -> None:
    spec = cbx.Spec(targets=["*"], rank=2, num_masks=2, overrides={
        "*": {"alpha": 4.0},
        "layers.*": {"rank": 4, "num_masks": 3},
        "layers.1": {"rank": 1, "density": 0.25},  # later and more specific: wins
    })
    assert spec.for_target("head").rank == 2 and spec.for_target("head").alpha == 4.0
    assert spec.for_target("layers.0").rank == 4 and spec.for_target("layers.0").num_masks == 3
    t1 = spec.for_target("layers.1")
    assert (t1.rank, t1.num_masks, t1.density) == (1, 3, 0.25)

    model = TwoPart()
    x = (torch.randn(2, 8),)
    tm = cbx.transform(model, spec, x)
    ads = cbx.adapters(tm)
    assert ads["layers.0"].A.shape == (4, 8) and ads["layers.0"].mask_A.shape[0] == 3
    assert ads["layers.1"].A.shape == (1, 8) and ads["head"].A.shape == (2, 8)
    assert ads["head"].scaling == 2.0
    rows = {r["name"]: r for r in cbx.inspect(model, spec, x).targets}
    assert (rows["layers.1"]["rank"], rows["layers.1"]["density"]) == (1, 0.25)
    assert rows["head"]["alpha"] == 4.0


def test_override_validation() -> None:
    with pytest.raises(cbx.SpecError, match="only"):
        cbx.Spec(targets=["*"], overrides={"*": {"seed": 3}})
    with pytest.raises(cbx.SpecError, match=r"overrides\['x'\].*density"):
        cbx.Spec(targets=["*"], overrides={"x": {"density": 2.0}})
    with pytest.raises(cbx.SpecTypeError):
        cbx.Spec(targets=["*"], overrides={"x": 3})
    spec = cbx.Spec(targets=["*"], overrides={"x": {"rank": 4}})
    assert cbx.Spec.from_dict(spec.to_dict()) == spec


class PAdapterRef(nn.Module):
    """A parallel adapter written as d separate masked copies, independently of the library."""

    def __init__(self, base: nn.Linear, a, act) -> None:
        super().__init__()
        self.base, self.a, self.act = base, a, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a
        out = self.base(x)
        for i in range(a.num_masks):
            down, up = a.A * a.mask_A[i], a.B * a.mask_B[i]
            out = out + a.scaling * self.act(x @ down.T) @ up.T
        return out


@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
def test_parallel_adapter_matches_d_copies_and_folds(activation: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 5)).double().eval()
    spec = cbx.Spec(targets=["0", "2"], rank=3, num_masks=3, density=0.5, method="padapter",
                    activation=activation)
    x = torch.randn(4, 12, dtype=torch.float64)
    tm = cbx.transform(model, spec, (x,)).eval()
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.A.normal_()
            a.B.normal_()
    act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "identity": nn.Identity()}[activation]
    ref = nn.Sequential(PAdapterRef(model[0], cbx.adapters(tm)["0"], act), nn.Tanh(),
                        PAdapterRef(model[2], cbx.adapters(tm)["2"], act))
    x2 = torch.randn(6, 12, dtype=torch.float64)
    torch.testing.assert_close(tm(x2), ref(x2), rtol=1e-10, atol=1e-10)
    deploy = cbx.fold(tm)
    torch.testing.assert_close(deploy(x2), tm(x2), rtol=1e-10, atol=1e-10)
    dense = [m for m in deploy.modules() if type(m).__name__ == "DenseAdapter"]
    if activation == "identity":  # folds into W0: nothing extra remains
        assert not dense and set(cbx.delta_weights(tm)) == {"0", "2"}
        cbx.merged_state_dict(tm)
    else:  # one dense width-d·r adapter per target, no masks
        assert len(dense) == 2 and dense[0].down.shape == (9, 12)
        assert not any("mask" in n for n, _ in deploy.named_buffers())
        assert cbx.delta_weights(tm) == {}
        with pytest.raises(cbx.FoldError, match="nonlinear"):
            cbx.merged_state_dict(tm)


def test_activation_needs_padapter() -> None:
    with pytest.raises(cbx.SpecError, match="padapter"):
        cbx.Spec(targets=["0"], activation="relu")
    with pytest.raises(cbx.SpecError, match="method"):
        cbx.Spec(targets=["0"], method="ia3")
