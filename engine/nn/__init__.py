"""Network blocks used by more than one family: the KV cache (cache.py) and GPT-2 (gpt2.py, and its compact
export form gpt2_graph.py), which the text and caption families both run."""
