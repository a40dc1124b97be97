"""Text generation: Llama and GPT-2 decoders (llama.py, gpt2.py), KV cache (cache.py), folder checks and loading
(models.py), sampling (sampling.py), the backend-independent generation loop (pipeline.py) and training
(train.py)."""
