"""Network blocks used by more than one family: the KV-cache protocol (cache.py), GPT-2 (gpt2.py: the text and
caption families both run it) and LoRA adapters (lora.py)."""
