"""Quality of the shipped model: it writes words, and its recorded held-out score is what the docs report."""
import json
import re
from pathlib import Path

import torch

from engine.generators import Context, ModelRef, Partial, Request, Result
from plugins import text as text_plugin
from plugins.text.models import check_folder

torch.set_num_threads(1)
MODEL = Path(__file__).resolve().parent.parent / "resources" / "models" / "shakespeare-llama"
REPORTED_BPC = 1.98  # docs/benchmarks_text.md and the report quote 1.974 (studio.json); target was <= 2.2
COMMON = {"the", "and", "i", "to", "of", "a", "my", "you", "that", "in", "is", "not", "me", "it", "with", "be",
          "your", "his", "thou", "thy", "this", "for", "he", "but", "have", "what", "so", "will", "lord", "our"}


def test_shipped_model_records_its_score():
    studio = json.loads((MODEL / "studio.json").read_text())
    assert studio["family"] == "llama" and studio["generator"] == "text"
    assert studio["scores"]["heldout_works"] == ["hamlet.txt", "tempest.txt", "sonnets.txt"]
    assert studio["scores"]["heldout_bpc"] <= REPORTED_BPC
    check_folder(MODEL, "llama")
    assert (MODEL / "model.safetensors").stat().st_size < 20e6


def test_shipped_model_writes_words():
    cfg = json.loads((MODEL / "config.json").read_text())
    ref = ModelRef(name="shakespeare-llama", path=MODEL, family="llama", hash="test", config=cfg)
    opts = text_plugin.INFO.resolve_options({"max_new_tokens": 80})
    events = list(text_plugin.generate(Request(prompt="KING.\nWhat say you, my lord?", options=opts, seed=1,
                                               model=ref), Context()))
    result = events[-1]
    assert isinstance(result, Result)
    assert "".join(e.text for e in events if isinstance(e, Partial)) == result.text
    words = re.findall(r"[A-Za-z']+", result.text)
    assert len(words) >= 20
    assert sum(w.lower() in COMMON for w in words) >= 5, result.text
    assert sum(c.isascii() for c in result.text) / len(result.text) > 0.99
