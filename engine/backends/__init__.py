"""Backend infrastructure every family shares: onnxruntime sessions and exports, graph helpers, the shared decoder
export and its parity check.

``runtime`` finds, checks and opens exports (onnxruntime, onnx, numpy only); ``common`` writes and quantizes graphs;
``decoder`` runs a KV-cached decoder graph on onnxruntime; ``decoders`` exports one and checks it against torch.
Each family's own exporter and runner live in its package (``plugins/<family>/onnx.py``);
``engine.onnx_export.export_model`` drives an export (temporary folder, parity gate, manifest, atomic rename).
"""
