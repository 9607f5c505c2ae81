"""CI smoke run of bench/quality.py's perplexity part on the tiny model: it writes well-formed results, and
bitsandbytes' quantization of the same weights is qlora's, bit for bit (not the numbers' quality)."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("bitsandbytes")


def test_perplexity_part_on_tiny_llama(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    sys.modules.pop("quality", None)
    import quality

    out = tmp_path / "q.json"
    assert quality.main(["--parts", "ppl", "--model", "builtin:tiny-llama", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    p = res["ppl"]
    rows = {r["model"]: r for r in p["rows"]}
    assert {"bf16", "qlora nf4 + dq", "bnb nf4 + dq, dequantize + F.linear", "qlora nf4", "qlora fp4 + dq"} <= set(rows)
    assert all(math.isfinite(r["ppl"]) and r["predicted_tokens"] == p["tokens"] - p["windows"] for r in rows.values())
    m = p["quantized_layers_match"]
    assert m["layers"] == 28 and m["identical"] == 28, m["differences"]  # 4 layers x 7 linears
    assert p["logits"]["bnb_dequant_vs_qlora_identical"]
    assert rows["bnb nf4 + dq, dequantize + F.linear"]["ppl"] == rows["qlora nf4 + dq"]["ppl"]
    assert "**28/28 layers identical**" in out.with_suffix(".md").read_text()
