"""Refusal-preserving compression (aird/core/protect.py, the wanda-rp and sparsegpt-rp plugins) on the tiny refusing
model."""

import pytest
import torch
from safetensors.torch import load_file

from aird.core.compress import CompressConfig, protected_method, run_compress
from aird.core.directions import cosine
from aird.core.errors import AirdError
from aird.core.loading import load_model
from aird.core.measure import decoder_linear_weights
from aird.core.probe import ProbeConfig, run_probe
from aird.core.protect import protected_scores, refusal_difference, refusal_saliency


@pytest.fixture(scope="module")
def probed(refusing, tmp_path_factory):
    model_dir, data = refusing
    out = tmp_path_factory.mktemp("protect") / "probe"
    lm = load_model(str(model_dir), device="cpu")
    run_probe(lm, ProbeConfig(n_train=48, n_val=16, batch_size=16, data_dir=str(data), top_k=2, max_scored=6), out)
    return model_dir, data, out


def test_saliency_is_the_first_order_change_of_the_refusal_projection(probed):
    """With no orthogonal probes, R is |w · ∂(r̂ᵀd)/∂w|: zeroing one weight moves r̂ᵀd by about that much (the
    weights of layers at or above the source cannot move d and get none)."""
    model_dir, data, probe = probed
    lm = load_model(str(model_dir), device="cpu")
    sal = refusal_saliency(lm, probe, n_prompts=16, probes=0, data_dir=str(data))
    layer = sal["layer"]
    assert 0 < layer and sal["saliency"]
    mods = {id(m): i for i, _n, m in lm.adapter.linears(lm.model)}
    assert all(mods[id(m)] < layer for m in sal["saliency"])
    from aird.core.diff import open_probe

    unit = open_probe(probe).chosen
    unit = unit / unit.norm()
    base = refusal_difference(lm, probe, n_prompts=16, data_dir=str(data)) @ unit
    # the three most salient single weights: the measured change agrees with the estimate to within 25%
    flat = [(float(R.flatten()[k]), m, k) for m, R in sal["saliency"].items() for k in [int(R.argmax())]]
    checked = 0
    for est, m, k in sorted(flat, key=lambda t: -t[0])[:3]:
        keep = m.weight.data.flatten()[k].item()
        with torch.no_grad():
            m.weight.data.view(-1)[k] = 0.0
        moved = abs(float(refusal_difference(lm, probe, n_prompts=16, data_dir=str(data)) @ unit - base))
        with torch.no_grad():
            m.weight.data.view(-1)[k] = keep
        assert moved == pytest.approx(est, rel=0.25), (moved, est)
        checked += 1
    assert checked == 3


def test_orthogonal_probes_only_add_to_the_saliency(probed):
    model_dir, data, probe = probed
    lm = load_model(str(model_dir), device="cpu")
    along = refusal_saliency(lm, probe, n_prompts=8, probes=0, data_dir=str(data))["saliency"]
    full = refusal_saliency(lm, probe, n_prompts=8, probes=3, data_dir=str(data))["saliency"]
    assert along.keys() == full.keys()
    assert all(bool((full[m] >= along[m] - 1e-6).all()) for m in full)
    assert any(bool((full[m] > along[m] + 1e-6).any()) for m in full)


def test_protected_scores_keep_the_base_ranking_without_saliency():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(8, 16, generator=g)
    assert torch.equal(protected_scores(base, None, 1.0), base)
    assert torch.equal(protected_scores(base, torch.rand(8, 16, generator=g), 0.0), base)
    sal = torch.zeros(8, 16)
    sal[3, 5] = 1.0
    out = protected_scores(base, sal, 1.0)
    assert int(out[3].argmax()) == 5                                    # the one salient weight ranks first
    assert torch.equal(out[0].argsort(), base[0].argsort())             # rows without saliency keep their order


def _d(model_dir, probe, data, folder=None):
    lm = load_model(str(folder or model_dir), device="cpu")
    return refusal_difference(lm, probe, n_prompts=32, data_dir=str(data))


@pytest.mark.parametrize("plain", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_protected_pruning_moves_the_direction_less_at_exactly_the_same_sparsity(probed, tmp_path, pattern, plain):
    model_dir, data, probe = probed
    params = {"pattern": pattern} if pattern else {"sparsity": 0.5}
    out = {}
    rp = plain + "-rp"
    for method, extra in ((plain, {}), (rp, {"reference": str(probe), "protect": 4.0})):
        lm = load_model(str(model_dir), device="cpu")
        cfg = CompressConfig(method=method, params={**params, **extra}, data_dir=str(data), calib_samples=16,
                             calib_seq_len=64)
        s = run_compress(lm, cfg, tmp_path / method).summary
        out[method] = s
        if pattern:
            assert s["nm_compliant"] is True
        assert s["sparsity"] == pytest.approx(0.5, abs=1e-3)
    prot = out[rp]
    assert prot["info"]["protect"]["matrices"] > 0 and prot["info"]["protect"]["strength"] == 4.0
    w0 = decoder_linear_weights(load_file(str(tmp_path / plain / "model.safetensors")))
    w1 = decoder_linear_weights(load_file(str(tmp_path / rp / "model.safetensors")))
    for k in w0:
        z0, z1 = int((w0[k] == 0).sum()), int((w1[k] == 0).sum())
        if pattern or plain == "wanda":
            assert z0 == z1, k           # exactly the same number of zeros in every written matrix
        else:
            # llm-compressor's SparseGPT prunes one weight more per block of 128 columns than ⌊sparsity · block⌋
            # (its threshold is inclusive); the protected copy prunes exactly ⌊sparsity · block⌋ (matrices below
            # the source layer; the others are SparseGPT's own)
            rows, cols = w1[k].shape
            blocks = -(-cols // 128)
            assert z0 - blocks <= z1 <= z0, k
    d0 = _d(model_dir, probe, data)
    d_plain = _d(model_dir, probe, data, tmp_path / plain)
    d_prot = _d(model_dir, probe, data, tmp_path / rp)
    assert (d_prot - d0).norm() < (d_plain - d0).norm()
    # (SparseGPT's reconstruction keeps the tiny model's direction at cosine 0.9999 already: no room to compare)
    assert float(cosine(d_prot, d0)) >= float(cosine(d_plain, d0)) - 1e-4


def _hessian(cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g)
    return 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_copy_without_protection_is_llm_compressors(nm):
    """With strength 0 the protected loop is SparseGPT itself: for N:M exactly llm-compressor's weights; unstructured,
    one block of columns, the same pruned set but for the one weight llm-compressor's inclusive threshold adds."""
    pytest.importorskip("llmcompressor")
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight

    from aird.plugins.compressors import sparsegpt_protected

    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(128, 12, bias=False)
    lin.weight.data = torch.randn(12, 128, generator=g)
    H = _hessian(128, 2)
    n, m = nm or (0, 0)
    loss0, ref = sparsify_weight(lin, {lin: H.clone()}, 0.5, n, m, 128, 0.01, False)
    loss1, ours = sparsegpt_protected(lin.weight.data, H, torch.rand(12, 128, generator=g), 0.0, 0.5, n, m, 128, 0.01)
    if nm:
        assert torch.allclose(ours, ref, atol=1e-5) and loss1 == pytest.approx(loss0, rel=1e-5)
        assert all(int((row.view(-1, 4) == 0).sum(1).min()) == 2 for row in ours)
    else:
        z_ours, z_ref = ours == 0, ref == 0
        assert int(z_ours.sum()) == 12 * 128 // 2 and int(z_ref.sum()) == 12 * 128 // 2 + 1
        assert bool((z_ref | ~z_ours).all())                        # every weight we pruned, it pruned too


def test_sparsegpt_protection_keeps_the_salient_weights_at_the_same_sparsity():
    from aird.plugins.compressors import sparsegpt_protected

    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 256, generator=g)
    H = _hessian(256, 4)
    sal = torch.zeros_like(W)
    sal[:, :8] = W[:, :8].abs() * 100          # the first 8 columns carry the refusal direction
    _, plain = sparsegpt_protected(W, H, sal, 0.0, 0.5, 0, 0)
    _, prot = sparsegpt_protected(W, H, sal, 1.0, 0.5, 0, 0)
    assert int((prot == 0).sum()) == int((plain == 0).sum()) == W.numel() // 2
    assert int((plain[:, :8] == 0).sum()) > 0 and int((prot[:, :8] == 0).sum()) == 0


def test_protect_refusal_names_the_variant_or_says_there_is_none():
    assert protected_method("wanda") == "wanda-rp"
    assert protected_method("sparsegpt") == "sparsegpt-rp"
    assert protected_method("gptq") == "gptq-rp"
    assert protected_method("wanda-rp") == "wanda-rp"
    with pytest.raises(AirdError, match="no refusal-preserving variant.*wanda"):
        protected_method("rtn")


def test_wanda_rp_needs_a_reference(refusing, tmp_path):
    model_dir, data = refusing
    lm = load_model(str(model_dir), device="cpu")
    with pytest.raises(AirdError, match="needs --reference"):
        run_compress(lm, CompressConfig(method="wanda-rp", params={"sparsity": 0.5}, data_dir=str(data),
                                        calib_samples=4, calib_seq_len=32), tmp_path / "x")


@pytest.mark.parametrize("args,message", [
    (["--method", "rtn", "--bits", "8", "--protect-refusal", "-r", "PROBE"], "rtn has no refusal-preserving variant"),
    (["--method", "wanda", "--sparsity", "0.5", "--protect-refusal"], "--protect-refusal needs --reference"),
    (["--method", "wanda", "--sparsity", "0.5", "-r", "PROBE"], "wanda takes no --reference"),
    (["--method", "wanda", "--protect-refusal", "-r", "MISSING"], "does not exist"),
])
def test_cli_protect_refusal_errors_are_one_sentence_before_the_model_loads(probed, tmp_path, args, message):
    from typer.testing import CliRunner

    from aird.cli.main import app

    _model_dir, _data, probe = probed
    args = [str(probe) if a == "PROBE" else str(tmp_path / "missing") if a == "MISSING" else a for a in args]
    # the model named does not exist: each error must come before anything tries to load it
    res = CliRunner().invoke(app, ["compress", "--model", str(tmp_path / "no-model"), *args, "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert message in " ".join(res.output.split()), res.output


def test_saliency_reports_progress_to_the_running_command(probed):
    """The saliency takes minutes on a real model: it advances one step per batch on the reporter of the command
    running it (compress sets it around the plugin), and reports to no one outside a command."""
    from aird.core.progress import Reporter, current, reporting

    class Recorder(Reporter):
        def __init__(self):
            self.stages = []

        from contextlib import contextmanager

        @contextmanager
        def stage(self, description, total):
            row = [description, total, 0]
            self.stages.append(row)
            yield lambda n=1, description=None: row.__setitem__(2, row[2] + n)

    model_dir, data, probe = probed
    lm = load_model(str(model_dir), device="cpu")
    rec = Recorder()
    with reporting(rec):
        assert current() is rec
        sal = refusal_saliency(lm, probe, n_prompts=8, probes=0, batch_size=3, data_dir=str(data))
    assert type(current()) is Reporter
    (desc, total, done), = rec.stages
    h, b = sal["prompts"]
    assert desc.startswith("refusal saliency") and total == done == -(-h // 3) - (-b // 3)


def test_refusal_hessians_weigh_the_input_directions_that_move_d(probed):
    """H_r (trace 1, symmetric, only below the source layer): a change of a matrix's weights along the input
    direction H_r weighs most moves the refusal difference d more than one of the same size along a direction it
    weighs least."""
    from aird.core.protect import refusal_hessians

    model_dir, data, probe = probed
    lm = load_model(str(model_dir), device="cpu")
    got = refusal_hessians(lm, probe, n_prompts=16, probes=3, data_dir=str(data))
    layer = got["layer"]
    mods = {id(m): i for i, _n, m in lm.adapter.linears(lm.model)}
    assert got["hessians"] and all(mods[id(m)] < layer for m in got["hessians"])
    d0 = refusal_difference(lm, probe, n_prompts=16, data_dir=str(data))
    g = torch.Generator().manual_seed(0)
    wins = 0
    for m, H in got["hessians"].items():
        assert float(torch.trace(H)) == pytest.approx(1.0, abs=1e-4) and torch.allclose(H, H.T, atol=1e-6)
        vals, vecs = torch.linalg.eigh(H.double())
        assert float(vals.min()) > -1e-6
        signs = torch.randint(0, 2, (m.out_features,), generator=g).float() * 2 - 1
        moved = []
        for v in (vecs[:, -1], vecs[:, 0]):
            keep = m.weight.data.clone()
            with torch.no_grad():
                m.weight.data += 0.05 * m.weight.data.abs().mean() * torch.outer(signs, v.float()) * m.in_features ** 0.5
            moved.append(float((refusal_difference(lm, probe, n_prompts=16, data_dir=str(data)) - d0).norm()))
            m.weight.data = keep
        wins += moved[0] > moved[1]
    assert wins >= 0.8 * len(got["hessians"]), (wins, len(got["hessians"]))


@pytest.mark.parametrize("protect", [0.0, 4.0])
def test_gptq_rp_stays_on_gptqs_grid(probed, tmp_path, protect):
    """gptq-rp quantizes with GPTQ's own scales (every written weight on the same int4 grid, the same bits): with
    protect 0 its weights are GPTQ's; with protection only the integer codes differ, and d moves less."""
    from aird.core.qgrid import on_grid, read_grid

    model_dir, data, probe = probed
    params = {"bits": 4, "group_size": 32}
    out = {}
    for method, extra in (("gptq", {}), ("gptq-rp", {"reference": str(probe), "protect": protect})):
        lm = load_model(str(model_dir), device="cpu")
        cfg = CompressConfig(method=method, params={**params, **extra}, data_dir=str(data), calib_samples=16,
                             calib_seq_len=64)
        out[method] = run_compress(lm, cfg, tmp_path / method).summary
    assert out["gptq-rp"]["info"]["protect"]["matrices"] > 0
    g0, g1 = read_grid(tmp_path / "gptq"), read_grid(tmp_path / "gptq-rp")
    assert g0.keys() == g1.keys() and g0
    w0 = decoder_linear_weights(load_file(str(tmp_path / "gptq" / "model.safetensors")))
    w1 = decoder_linear_weights(load_file(str(tmp_path / "gptq-rp" / "model.safetensors")))
    changed = 0
    for name, grid in g1.items():
        assert torch.equal(grid.scale, g0[name].scale), name
        assert on_grid(w1[name + ".weight"], grid), name
        changed += not torch.equal(w0[name + ".weight"], w1[name + ".weight"])
    if protect == 0:
        assert changed == 0
        return
    assert changed > 0
    d0 = _d(model_dir, probe, data)
    d_plain = _d(model_dir, probe, data, tmp_path / "gptq")
    d_prot = _d(model_dir, probe, data, tmp_path / "gptq-rp")
    assert (d_prot - d0).norm() < (d_plain - d0).norm()


def test_one_pass_gives_the_saliency_and_the_hessians_of_two(probed):
    from aird.core.protect import refusal_hessians, refusal_measures

    model_dir, data, probe = probed
    lm = load_model(str(model_dir), device="cpu")
    both = refusal_measures(lm, probe, n_prompts=8, probes=2, data_dir=str(data))
    sal = refusal_saliency(lm, probe, n_prompts=8, probes=2, data_dir=str(data))["saliency"]
    hes = refusal_hessians(lm, probe, n_prompts=8, probes=2, data_dir=str(data))["hessians"]
    assert both["saliency"].keys() == sal.keys() and both["hessians"].keys() == hes.keys() and sal
    assert all(torch.allclose(both["saliency"][m], sal[m], rtol=1e-4, atol=1e-7) for m in sal)
    assert all(torch.allclose(both["hessians"][m], hes[m], rtol=1e-4, atol=1e-7) for m in hes)


def test_probes_one_at_a_time_give_what_one_pass_gives(probed):
    """When the free memory cannot hold every probe's gradient at once, the saliency and the Hessians are taken a
    chunk of probe vectors at a time (the forward rerun per chunk): the same measures, up to rounding."""
    from aird.core.protect import refusal_measures

    model_dir, data, probe = probed
    lm = load_model(str(model_dir), device="cpu")
    whole = refusal_measures(lm, probe, n_prompts=8, probes=2, data_dir=str(data), chunk=3)
    single = refusal_measures(lm, probe, n_prompts=8, probes=2, data_dir=str(data), chunk=1)
    pairs = refusal_measures(lm, probe, n_prompts=8, probes=2, data_dir=str(data), chunk=2)
    assert (whole["chunk"], single["chunk"], pairs["chunk"]) == (3, 1, 2) and whole["saliency"]
    assert whole["positions"] == single["positions"] == pairs["positions"] > 0
    for got in (single, pairs):
        assert got["d_norm"] == pytest.approx(whole["d_norm"], rel=1e-5)
        assert all(torch.allclose(got["saliency"][m], s, rtol=1e-4, atol=1e-7) for m, s in whole["saliency"].items())
        assert all(torch.allclose(got["hessians"][m], h, rtol=1e-4, atol=1e-7) for m, h in whole["hessians"].items())
    with pytest.raises(AirdError, match="chunk"):
        refusal_measures(lm, probe, n_prompts=8, probes=2, data_dir=str(data), chunk=0)


def test_probe_chunk_fits_the_free_memory():
    from aird.core.protect import probe_chunk

    w = 10**9                                   # a billion protected weights: 4 GB per float32 copy
    assert probe_chunk(4, w, 0, 10**12) == 4    # plenty: all four probe vectors in one pass
    assert probe_chunk(4, w, 0, 24 * 10**9) == 1    # 24 GB: 0.75·24 − 4 = 14 GB, one vector (8 GB) at a time
    assert probe_chunk(4, w, 0, 40 * 10**9) == 3    # 0.75·40 − 4 = 26 GB: three
    assert probe_chunk(4, w, 8 * 10**9, 40 * 10**9) == 2    # the Hessians take their share first
    assert probe_chunk(4, w, 0, 10**9) == 1     # never fewer than one
    assert probe_chunk(4, 0, 0, 10**9) == 4     # no saliency (Hessians only): nothing scales with the probes


def test_level_protection_keeps_the_midpoint_where_it_was(probed, tmp_path):
    """protect_level adds the midpoint's projection r̂ᵀm to what the saliency and the refusal Hessian protect:
    pruned by sparsegpt-rp with it, the harmful and harmless means stay closer to where they were along r̂ (on this
    model m's shift halves: 0.079 → 0.040; Wanda, which has no reconstruction, moves m alike either way), at the
    same sparsity, and the level's weight is in the record."""
    from aird.core.diff import open_probe
    from aird.core.protect import refusal_means, refusal_measures

    model_dir, data, probe = probed
    unit = open_probe(probe).chosen
    unit = unit / unit.norm()
    lm = load_model(str(model_dir), device="cpu")
    d0, m0 = refusal_means(lm, probe, n_prompts=32, data_dir=str(data))
    assert torch.allclose(d0, refusal_difference(lm, probe, n_prompts=32, data_dir=str(data)))
    with_level = refusal_measures(lm, probe, hessians=False, n_prompts=8, probes=0, data_dir=str(data), level=1.0)
    without = refusal_measures(lm, probe, hessians=False, n_prompts=8, probes=0, data_dir=str(data))
    assert with_level["level"] == 1.0 and without["level"] == 0.0
    assert all(bool((with_level["saliency"][m] >= s - 1e-6).all()) for m, s in without["saliency"].items())
    with pytest.raises(AirdError, match="level"):
        refusal_measures(lm, probe, n_prompts=8, data_dir=str(data), level=-1.0)
    moved = {}
    for name, level in (("d", 0.0), ("dm", 16.0)):
        lm = load_model(str(model_dir), device="cpu")
        cfg = CompressConfig(method="sparsegpt-rp", params={"sparsity": 0.5, "reference": str(probe), "protect": 4.0,
                                                        "protect_level": level},
                             data_dir=str(data), calib_samples=16, calib_seq_len=64)
        s = run_compress(lm, cfg, tmp_path / name).summary
        assert s["sparsity"] == pytest.approx(0.5, abs=1e-3) and s["info"]["protect"]["level"] == level
        _d, m = refusal_means(load_model(str(tmp_path / name), device="cpu"), probe, n_prompts=32, data_dir=str(data))
        moved[name] = abs(float((m - m0) @ unit))
    assert moved["dm"] < 0.75 * moved["d"], moved
