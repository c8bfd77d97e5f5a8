import math

import pytest
import torch

from kvformer import ModelConfig, Transformer
from kvformer.cli.main import main
from kvformer.tools import pictures as P

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    import matplotlib.image
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_kv_size_rows_equal_the_closed_form():
    cfg = ModelConfig.preset("llama-2-70b")
    rows = P.kv_size_rows("llama-2-70b", cfg, 4096, 8, torch.float16)
    by = {r.variant: r for r in rows}
    assert set(by) == {"MHA", "GQA (8 KV heads)", "MQA"}
    for r in rows:
        # 2 * n_layer * n_kv_head * head_dim * tokens * batch * bytes, by hand
        assert r.total == 2 * 80 * r.n_kv_head * 128 * 4096 * 8 * 2
        assert r.per_token == 2 * 80 * r.n_kv_head * 128 * 2
    assert by["MHA"].total == 8 * by["GQA (8 KV heads)"].total == 64 * by["MQA"].total
    assert by["GQA (8 KV heads)"].own and not by["MHA"].own


def test_kv_size_rows_add_int8_and_int4_with_their_scales():
    """Llama-2-70B at 4,096 tokens: MHA fp16 down to MQA int4, the scales counted."""
    cfg = ModelConfig.preset("llama-2-70b")
    rows = P.kv_size_rows("llama-2-70b", cfg, 4096, 1, ["fp16", "int8", "int4"])
    by = {(r.variant, r.dtype): r.total for r in rows}
    head_row = {"fp16": 128 * 2, "int8": 128 + 2, "int4": 64 + 8 * 2}  # bytes, by hand
    for (variant, dt), total in by.items():
        kv = {"MHA": 64, "GQA (8 KV heads)": 8, "MQA": 1}[variant]
        assert total == 2 * 80 * kv * 4096 * head_row[dt]
    assert len(by) == 9 and by[("MHA", "fp16")] / by[("GQA (8 KV heads)", "int8")] > 15


def test_kv_size_cli_prints_exact_bytes_and_plots(tmp_path, capsys):
    out = tmp_path / "kv.png"
    assert main(["kv-size", "llama-2-70b", "smollm2-135m", "--context", "1000",
                 "--dtype", "fp32", "--plot", str(out)]) == 0
    text = capsys.readouterr().out
    mqa_70b = 2 * 80 * 1 * 128 * 1000 * 4
    assert f"{mqa_70b:,} B" in text and "MiB" in text and "64.0×" in text and "8.0×" in text
    assert_png(out)
    assert main(["kv-size", "llama-2-70b", "--context", "4096", "--plot", str(out)]) == 0
    text = capsys.readouterr().out  # the default: fp16, int8 and int4 side by side
    gqa_int8 = 2 * 80 * 8 * 4096 * (128 + 2)
    assert f"{gqa_int8:,} B" in text and " int4 " in text and "15.8×" in text
    assert_png(out)


def test_bad_kv_size_input_is_one_line(capsys):
    assert main(["kv-size", "llama-2-70b", "--dtype", "fp64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fp64" in err[0]


def test_scaled_entropy_beats_unscaled_from_d64():
    stats = P.random_scaling_stats(dims=(16, 64, 256), trials=300)
    for s in stats:
        assert s["var_dot"] == pytest.approx(s["d_k"], rel=0.15)  # Var(q.k) = d_k
        assert s["var_scaled"] == pytest.approx(1.0, rel=0.15)
        if s["d_k"] >= 64:
            assert s["entropy_scaled"] > s["entropy_unscaled"] + 1.0
    unscaled = [s["entropy_unscaled"] for s in stats]
    assert unscaled == sorted(unscaled, reverse=True)  # collapses as d_k grows


def test_unscale_recovers_the_unscaled_softmax_exactly():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 5, generator=g) * 4
    s = s.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    d_k = 64
    scaled = torch.softmax(s / math.sqrt(d_k), -1)
    torch.testing.assert_close(P.unscale(scaled, d_k), torch.softmax(s, -1), atol=1e-5,
                               rtol=1e-4)


def test_recorded_weights_are_the_models_own_and_leave_output_unchanged():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=30, d_model=32, n_layer=2, n_head=4,
                                    n_kv_head=2)).eval()
    ids = [1, 5, 7, 2, 9]
    with torch.no_grad():
        before = model(torch.tensor([ids]))
    layers = P.record_attention(model, ids)
    assert len(layers) == 2 and layers[0].shape == (4, 5, 5)
    for w in layers:
        torch.testing.assert_close(w.sum(-1), torch.ones(4, 5))
        assert torch.all(w.triu(1) == 0)  # causal: nothing after the query
    # layer 0's weights by hand from the layer's own projections
    blk = model.layers[0]
    with torch.no_grad():
        h = blk.attn_norm(model.tok_emb(torch.tensor([ids])))
        q = blk.attn.wq(h).view(1, 5, 4, 8).transpose(1, 2)
        k = blk.attn.wk(h).view(1, 5, 2, 8).transpose(1, 2)
        cos, sin = model.rotary.cos_sin(torch.arange(5))
        from kvformer.model.positions import apply_rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k = k.repeat_interleave(2, 1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
        s = s.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
        torch.testing.assert_close(layers[0], torch.softmax(s, -1)[0])
        assert torch.equal(model(torch.tensor([ids])), before)
    assert all(b.attn.weights_sink is None for b in model.layers)


def test_pictures_are_valid_pngs(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=30, d_model=32, n_layer=2, n_head=4)).eval()
    layers = P.record_attention(model, list(range(10)))
    assert_png(P.plot_attention(layers[1], [str(i) for i in range(10)], tmp_path / "a.png",
                                "grid"))
    assert_png(P.plot_attention(layers[1], [str(i) for i in range(10)], tmp_path / "h.png",
                                "one", head=2))
    stats = P.random_scaling_stats(dims=(4, 64), trials=50)
    ent = P.model_entropy_per_head(layers, 8, skip=2)
    assert_png(P.plot_scaling(stats, tmp_path / "s.png", ent, "tiny"))
    reported = []
    rows = P.time_per_token(model, [4, 16], repeats=1, report=reported.append)
    assert reported == rows and [r["length"] for r in rows] == [4, 16]  # each as measured
    assert all(r["with_cache_s"] > 0 and r["without_cache_s"] > 0 for r in rows)
    assert_png(P.plot_cache_timing(rows, tmp_path / "c.png", "tiny"))


@pytest.mark.parametrize("names", [["smollm2-135m"], ["smollm2-135m", "llama-2-7b"]])
def test_kv_size_plot_keeps_its_title_and_legend_inside(names):
    """`kv-size --plot` with one model: its title and legend fit the narrower figure."""
    rows = [r for n in names for r in P.kv_size_rows(n, ModelConfig.preset(n), 4096, 1,
                                                     ["fp16", "int8", "int4"])]
    fig = P.kv_sizes_figure(rows, 4096, 1)
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    for artist in (fig._suptitle, *fig.legends):
        extent = artist.get_window_extent(renderer)
        assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1, artist
        assert box.y0 - 1 <= extent.y0 and extent.y1 <= box.y1 + 1, artist
    P.plt.close(fig)
