"""File formats: model sources (Hugging Face folders, GGUF, ``.pt2``), native Hugging Face write-back and ONNX.
Everything written here is written atomically; no pickle is loaded."""
