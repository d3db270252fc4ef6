"""The online scoring service: FastAPI app, feature stores, batcher, onnxruntime scorer.

Nothing here imports torch or the training code; the service image runs without them.
"""
