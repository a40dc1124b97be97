"""Image captioning: a ViT encoder + GPT-2 decoder (transformers' VisionEncoderDecoderModel layout).

vit.py (encoder), model.py (the network, loading, the torch runner), decode.py (greedy and beam search on
numpy logits), tokenizer.py, pipeline.py (image -> caption), train.py (``studio train caption``).
"""
