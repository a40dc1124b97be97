"""The ONNX backend: exporters (torch needed) and onnxruntime runners (torch not needed).

``engine.onnx.runtime`` finds, checks and opens exports (onnxruntime, onnx, numpy only); ``engine.onnx.text``,
``engine.onnx.caption`` and ``engine.onnx.image`` hold each family's exporter (torch imported inside functions)
and its onnxruntime runner; ``engine.onnx_export.export_model`` drives an export (temporary folder, parity gate,
manifest, atomic rename).
"""
