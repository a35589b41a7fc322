"""Many fine-tunes on one ONNX base (onnxruntime multi-LoRA): the base file equals the training
module; each adapter file, switched per run (also from several threads), equals its fine-tune's
folded model and an independent float64 reference; mismatched and damaged adapters refused."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from models import CASES, first_tensor

import capaboost_fx as cbx
from capaboost_fx.cli import main

LLAMA = next(c for c in CASES if c.name == "llama")
SPEC = dict(targets=["*.q_proj", "*.v_proj", "*.down_proj"], rank=4, num_masks=2, density=0.5)
ROOT = Path(__file__).resolve().parents[1]


def _fine_tune(model, seed: int, **changes) -> cbx.CapaBoostModel:
    """A fine-tune with non-zero adapters (B random, A moved), so no equality holds by luck."""
    args, kwargs = LLAMA.inputs(*LLAMA.example)
    tm = cbx.transform(model, cbx.Spec(**{**SPEC, "seed": seed, **changes}), args, kwargs).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.copy_(torch.randn(a.B.shape, generator=gen) * 0.3)
            a.A.add_(torch.randn(a.A.shape, generator=gen) * 0.05)
    return tm


def _float64_reference(model, tm, args, kwargs) -> np.ndarray:
    """The base model with W0 + s·Σ_i (B⊙M^B_i)(A⊙M^A_i) per target, the sum taken one masked
    copy at a time in float64 from the adapter's own A, B and masks (not the library's
    stacked factors, fold or files)."""
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, a in cbx.adapters(tm).items():
            delta = torch.zeros(a.B.shape[0], a.A.shape[1], dtype=torch.float64)
            for i in range(a.mask_A.shape[0]):
                delta += (a.B.double() * a.mask_B[i]) @ (a.A.double() * a.mask_A[i])
            ref.get_submodule(name).weight.add_(a.scaling * delta)
        return first_tensor(ref(*args, **kwargs)).numpy()


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.manual_seed(0)
    model = LLAMA.build().eval()
    model.config.use_cache = False
    tms = {"a": _fine_tune(model, 1), "b": _fine_tune(model, 2, density=0.75)}
    d = tmp_path_factory.mktemp("multi_lora")
    args, kwargs = LLAMA.inputs(*LLAMA.example)
    rep = cbx.export_onnx(tms["a"], d / "base.onnx", example_inputs=args,
                          example_kwargs=kwargs, multi_lora=True)
    files = {k: cbx.save_onnx_adapter(tm, d / f"{k}.onnx_adapter", base=d / "base.onnx")
             for k, tm in tms.items()}
    sess = cbx.MultiLoraSession(d / "base.onnx", files)
    return model, tms, rep, files, sess, d


def test_base_file_equals_the_training_module(served) -> None:
    model, tms, rep, _, sess, _ = served
    assert rep.max_rel_diff < 1e-5 and rep.export.verified
    assert sorted(rep.targets) == sorted(cbx.adapters(tms["a"]))
    assert len(rep.slots) == 2 * len(rep.targets) == 12
    assert rep.slots["capaboost.model.layers.0.self_attn.q_proj.lora_A"]["shape"] == [32, 8]
    (ids,), _ = LLAMA.inputs(*LLAMA.other)
    got = sess.run({"input_ids": ids})[0]
    with torch.no_grad():
        want = first_tensor(tms["a"](ids)).numpy()
        base = first_tensor(model(ids)).numpy()
    assert _rel(got, want) < 1e-4
    assert _rel(got, base) > 1e-2  # the adapters change the output


def test_adapters_switch_per_request(served) -> None:
    model, tms, _, _, sess, _ = served
    (ids,), _ = LLAMA.inputs(*LLAMA.other)
    with torch.no_grad():
        folded = {k: first_tensor(cbx.fold(tm)(ids)).numpy() for k, tm in tms.items()}
        exact = {k: _float64_reference(model, tm, (ids,), {}) for k, tm in tms.items()}
    assert _rel(folded["a"], folded["b"]) > 1e-2
    for name in ["a", "b", "a", "b", "b", None, "a"]:
        got = sess.run({"input_ids": ids}, adapter=name)[0]
        key = name or "a"  # no adapter: the file's own defaults, fine-tune a
        assert _rel(got, folded[key]) < 1e-4, name
        assert _rel(got, exact[key]) < 1e-4, name


def test_file_factors_are_the_rank_dr_product(served) -> None:
    _, tms, _, files, _, _ = served
    tensors = cbx.read_onnx_adapter(files["b"])
    for name, a in cbx.adapters(tms["b"]).items():
        delta = torch.zeros(a.B.shape[0], a.A.shape[1], dtype=torch.float64)
        for i in range(a.num_masks):
            delta += (a.B.double() * a.mask_B[i]) @ (a.A.double() * a.mask_A[i])
        lora_a = tensors[f"capaboost.{name}.lora_A"].astype(np.float64)
        lora_b = tensors[f"capaboost.{name}.lora_B"].astype(np.float64)
        assert lora_a.shape == (a.in_features, a.rank * a.num_masks)
        np.testing.assert_allclose((lora_a @ lora_b).T, a.scaling * delta.detach().numpy(),
                                   rtol=1e-5, atol=1e-7)


def test_requests_from_several_threads(served) -> None:
    _, tms, _, _, sess, _ = served
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 99, (2, 9), generator=gen) for _ in range(3)]
    with torch.no_grad():
        want = {(k, i): first_tensor(cbx.fold(tm)(x)).numpy()
                for k, tm in tms.items() for i, x in enumerate(batches)}
    jobs = [(name, i) for i in range(3) for name in ("a", "b", None)] * 4

    def serve(job):
        name, i = job
        return job, sess.run({"input_ids": batches[i]}, adapter=name)[0]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(serve, jobs))
    for (name, i), got in results:
        assert _rel(got, want[(name or "a", i)]) < 1e-4, (name, i)


def test_mismatched_fine_tunes_are_refused(served, tmp_path) -> None:
    model, _, _, _, sess, d = served
    other_rank = _fine_tune(model, 3, rank=2)
    with pytest.raises(cbx.AdapterMismatchError, match=r"rank d·r 4 where the base has 8"):
        cbx.save_onnx_adapter(other_rank, tmp_path / "r.onnx_adapter", base=d / "base.onnx")
    assert not (tmp_path / "r.onnx_adapter").exists()
    other_targets = _fine_tune(model, 4, targets=["*.q_proj", "*.o_proj"])
    with pytest.raises(cbx.AdapterMismatchError,
                       match=r"base has and this fine-tune lacks: \['model.layers.0.mlp.down_proj"
                             r".*fine-tune has and the base lacks: \['model.layers.0.self_attn"
                             r".o_proj"):
        cbx.save_onnx_adapter(other_targets, tmp_path / "t.onnx_adapter", base=d / "base.onnx")
    # written without the base, refused when served on it
    path = cbx.save_onnx_adapter(other_rank, tmp_path / "r.onnx_adapter")
    with pytest.raises(cbx.AdapterMismatchError, match="rank d·r 4 where the base has 8"):
        sess.add("r", path)
    assert sess.adapters == ["a", "b"]
    # same targets and ranks, trained on other base weights: fits, but said
    other = LLAMA.build().eval()
    other.config.use_cache = False
    with pytest.warns(cbx.CapaBoostWarning, match="trained on base weights that differ"):
        path = cbx.save_onnx_adapter(_fine_tune(other, 5), tmp_path / "o.onnx_adapter",
                                     base=d / "base.onnx")
    with pytest.warns(cbx.CapaBoostWarning, match="trained on base weights that differ"):
        cbx.load_onnx_adapter(path, base=d / "base.onnx")
    with pytest.raises(cbx.InputError, match="no adapter named 'r'"):
        sess.run({"input_ids": torch.zeros(1, 3, dtype=torch.long)}, adapter="r")


def test_damaged_adapter_files_are_refused(served, tmp_path) -> None:
    _, _, _, files, sess, d = served
    data = files["a"].read_bytes()
    truncated = tmp_path / "truncated.onnx_adapter"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(cbx.AdapterFileError, match="damaged or not an onnxruntime adapter"):
        sess.add("t", truncated)
    tampered = tmp_path / "tampered.onnx_adapter"
    raw = bytearray(data)
    some = next(iter(cbx.read_onnx_adapter(files["a"]).values())).tobytes()
    at = data.find(some)
    assert at > 0
    raw[at + len(some) // 2] ^= 0x40  # one bit inside a tensor's values
    tampered.write_bytes(bytes(raw))
    with pytest.raises(cbx.AdapterFileError, match="checksum"):
        cbx.load_onnx_adapter(tampered, base=d / "base.onnx")
    with pytest.raises(cbx.AdapterFileNotFoundError):
        cbx.load_onnx_adapter(tmp_path / "missing.onnx_adapter")
    assert sess.adapters == ["a", "b"]


def test_what_cannot_be_served_as_adapters(served, tmp_path) -> None:
    model, tms, _, _, _, _ = served
    (ids,), _ = LLAMA.inputs(*LLAMA.example)
    with pytest.raises(cbx.InputError, match="needs the training module"):
        cbx.export_onnx(cbx.fold(tms["a"]), tmp_path / "x.onnx", example_inputs=(ids,),
                        multi_lora=True)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    tm = cbx.transform(mlp, cbx.Spec(targets=["0"], rank=2, trainable=["2"]),
                       (torch.randn(3, 8),))
    with pytest.raises(cbx.TargetError, match=r"spec.trainable=\['2'\]"):
        cbx.save_onnx_adapter(tm, tmp_path / "x.onnx_adapter")
    assert not list(tmp_path.iterdir())


def test_cli_writes_an_adapter(served, tmp_path, capsys) -> None:
    _, tms, _, _, _, d = served
    fac = tmp_path / "fac.py"
    fac.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        import torch
        from models import CASES
        def llama():
            torch.manual_seed(0)
            case = next(c for c in CASES if c.name == "llama")
            model = case.build().eval()
            model.config.use_cache = False
            return model, case.inputs(3, 7)[0]
    """))
    cbx.save_adapter(tms["b"], tmp_path / "b.safetensors")
    out = tmp_path / "b.onnx_adapter"
    assert main(["onnx-adapter", "--model", f"{fac}:llama", "--adapter",
                 str(tmp_path / "b.safetensors"), "--out", str(out),
                 "--base", str(d / "base.onnx")]) == 0
    assert "6 targets, fits" in capsys.readouterr().out
    ours = cbx.read_onnx_adapter(out)
    want = cbx.read_onnx_adapter(d / "b.onnx_adapter")
    assert sorted(ours) == sorted(want)
    for k in ours:
        np.testing.assert_array_equal(ours[k], want[k])
    assert main(["onnx-adapter", "--model", f"{fac}:llama", "--out", str(out)]) == 1
    assert "--adapter" in capsys.readouterr().err


def test_serve_many_example_runs(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "serve_many.py"),
                           "--out", str(tmp_path), "--tenants", "2", "--steps", "2"],
                          capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all requests equal their folded fine-tunes" in proc.stdout


@pytest.mark.parametrize("capture", ["graph", "eager"])
def test_both_capture_paths_and_your_model_untouched(capture, tmp_path) -> None:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    x = torch.randn(3, 8)
    tm = cbx.transform(mlp, cbx.Spec(targets=["0", "2"], rank=2, num_masks=3, density=0.5),
                       (x,), capture=capture).eval()
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_(0, 0.5)
    trained = {k: v.clone() for k, v in tm.state_dict().items()}
    cbx.export_onnx(tm, tmp_path / "m.onnx", example_inputs=(x,), multi_lora=True)
    sess = cbx.MultiLoraSession(tmp_path / "m.onnx")
    x2 = torch.randn(5, 8)
    with torch.no_grad():
        want = cbx.fold(tm)(x2).numpy()
        base = mlp(x2).numpy()
    got = sess.run({sess.input_names[0]: x2})[0]
    assert _rel(got, want.astype(np.float64)) < 1e-4 and _rel(got, base) > 1e-2
    for k, v in mlp.state_dict().items():  # your model and the training module unchanged
        assert torch.equal(v, before[k]), k
    for k, v in tm.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, trained[k]), k
    assert tm.training is False
    wrapped = [m for m in list(mlp.modules()) + list(tm.modules())
               if type(m).__name__ == "_LoraLinear"]
    assert not wrapped  # the served structure is a copy: no module of yours was replaced
