"""The one onnxruntime session every peer builds, with the settings ctr-serve's scorer uses.

CPU provider, one intra-op and one inter-op thread, sequential execution, every graph
optimisation, no spinning: the same as `ctr serve --intra-op-threads 1 --providers
CPUExecutionProvider` (service/scorer.py), so the comparison is of the servers, not of
onnxruntime configurations.
"""

from __future__ import annotations

import argparse

import numpy as np


def session(model_path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_path, sess_options=opts, providers=["CPUExecutionProvider"])


def score(sess, tokens: np.ndarray) -> np.ndarray:
    """probability for each row of an int64 [rows, fields] matrix."""
    return sess.run(["probability"], {"tokens": tokens})[0]


def parser(description: str) -> argparse.ArgumentParser:
    """The command line every peer module takes, so peers.py launches them all the same way."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", required=True, help="path to model.onnx")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--max-batch-rows", type=int, default=1024, help="batch cap in rows (ctr-serve's default)")
    ap.add_argument("--max-delay-ms", type=float, default=2.0, help="how long a batch waits for more (ctr-serve's default)")
    ap.add_argument("--items", type=int, default=100, help="rows per request (for batchers that count requests)")
    return ap
