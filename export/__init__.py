"""ONNX export, the model package format and the model repository.

`export.package` and `export.offline_scorer` are torch-free, because the serving image
imports them without torch; `export.onnx_export` and `export.parity` need torch.
"""
