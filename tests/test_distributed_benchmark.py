"""benchmarks/distributed.py: its byte counts against the formulas of docs/design.md §6."""

from benchmark_scripts import load_benchmark


def test_mlp_byte_counts_match_the_formulas(monkeypatch):
    bench = load_benchmark("distributed", monkeypatch)
    counted = bench.bytes_per_step("mlp", 64, 2)
    b_r, s, R, f32 = 32, 9, 2, 4  # cross-entropy on 10 classes: s = 9
    m_r, m = b_r * s, 64 * s
    widths = [(784, 256), (256, 256), (256, 10)]
    head = b_r * (1 + 10 + 10 * s + s) * f32
    assert counted["head_bytes"] == head
    assert [layer["form"] for layer in counted["layers"]] == ["factors"] * 3
    assert [layer["chosen"] for layer in counted["layers"]] == ["gather"] * 3
    assert counted["total"]["chosen"] == counted["total"]["gather"]
    assert counted["total"]["gather"] == (R - 1) * (sum(b_r * i + m_r * o for i, o in widths) * f32 + head)
    n = [i * o + o for i, o in widths]
    assert counted["total"]["ddp"] == sum(2 * (R - 1) // R * k * f32 for k in n)
    assert counted["total"]["shard"] == sum(m_r * k * f32 * (R - 1) // R for k in n) + (R - 1) * m * m * f32 + (R - 1) * head


def test_transformer_shards_its_per_sample_rows(monkeypatch):
    """MultiheadAttention (generic rule) and the LayerNorms travel as rows; the code shards them."""
    bench = load_benchmark("distributed", monkeypatch)
    counted = bench.bytes_per_step("transformer", 64, 2)
    rows = [layer for layer in counted["layers"] if layer["form"] == "rows"]
    assert rows and all(layer["chosen"] == "shard" for layer in rows)
    assert counted["total"]["chosen"] < min(counted["total"]["gather"], counted["total"]["shard"])
