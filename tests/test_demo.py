"""`zerotune demo --quick` end to end: every stage runs and writes its runs and the summary."""

import json

from zerotune.demo import demo


def test_quick_demo_runs_every_stage(tmp_path):
    lines = []
    results = demo(out=tmp_path / "demo", quick=True, log=lines.append)
    assert set(results) >= {"digits_mlp", "digits_cnn", "pydoc_gpt", "minilm_lora", "pydoc_gpt_sft"}
    assert results["digits_mlp"]["accuracy"] > 0.9 and results["digits_cnn"]["accuracy"] > 0.9
    assert results["pydoc_gpt"]["perplexity"] < 2048  # better than uniform over the 2,048-token vocabulary
    assert results["pydoc_gpt"]["val_documents"] >= 50  # measured on many documents, not one topic
    for run in ("digits_mlp", "digits_cnn", "pydoc_gpt", "minilm_lora", "pydoc_gpt_sft"):
        assert (tmp_path / "demo" / run / "report.md").exists(), run
    assert (tmp_path / "demo" / "report.md").exists()
    assert any("»" in line for line in lines)  # samples were printed
    for run in ("digits_cnn_pruned", "pydoc_gpt_int8"):  # compressed copies, measured before and after
        report = json.loads((tmp_path / "demo" / run / "compress.json").read_text())
        assert report["before"] and report["after"] == results[run]
    assert results["digits_mlp_onnx"]["max_abs_diff"] < 1e-4 and results["digits_mlp_onnx"]["same_prediction"] == 1.0
