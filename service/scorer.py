"""onnxruntime scoring of token batches: exact shapes on CPU, padded to warmed buckets on CUDA.

Why buckets: the first run of a new input shape costs more than later ones (allocation,
kernel selection, on CUDA a graph capture), so on CUDA every batch is padded with PAD rows up
to the next bucket and each bucket is run before the service reports ready. On CPU the padded
rows cost more than new shapes do: over a stream of 600 batches of random sizes, exact shapes
took 13% (Frappe DNN) and 15% (Frappe DGenCTR) less CPU than padded ones, and a new shape's
first run cost at most ~45% over its later runs, once (benchmarks/padding.py,
docs/benchmarks.md), so there the batch runs as it is (`pad`, default: only on CUDA). Why report the provider:
onnxruntime silently falls back to CPU when CUDA cannot load, and a GPU service that quietly
runs on CPU is an outage nobody sees. Thread counts are set explicitly because the default
(one intra-op thread per core, plus spinning) fights the event loop and the other workers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model.logs import kv

log = logging.getLogger(__name__)


class Scorer:
    def __init__(
        self,
        model_path: str | Path,
        providers: Sequence[str] = ("CUDAExecutionProvider", "CPUExecutionProvider"),
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024),
        input_name: str = "tokens",
        output_name: str = "probability",
        pad: bool | None = None,
    ) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads or (os.cpu_count() or 1)
        opts.inter_op_num_threads = inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning workers burn the cores the event loop and JSON parsing need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = set(ort.get_available_providers())
        wanted = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=wanted)
        self.provider = self.session.get_providers()[0]
        self.requested_providers = list(providers)
        self.buckets = sorted(set(int(b) for b in buckets))
        self.input_name = input_name
        self.output_name = output_name
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != input_name:
            raise ValueError(f"model input must be one '{input_name}' tensor, found {[i.name for i in inputs]}")
        shape = inputs[0].shape
        self.num_fields = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
        self.use_iobinding = self.provider == "CUDAExecutionProvider"
        self.pad = self.use_iobinding if pad is None else bool(pad)
        if self.provider != wanted[0]:
            log.warning("scorer_fallback %s", kv(requested=wanted[0], active=self.provider))
        log.info(
            "scorer %s",
            kv(model=model_path, provider=self.provider, intra_op=opts.intra_op_num_threads, buckets=self.buckets, pad=self.pad, iobinding=self.use_iobinding),
        )

    def bucket_for(self, rows: int) -> int:
        for b in self.buckets:
            if b >= rows:
                return b
        return rows  # larger than every bucket: the batcher never sends this, direct callers may

    def warmup(self, num_fields: int, runs: int = 2) -> None:
        """Run every bucket shape so the first real request does not pay for it (unpadded, the
        same sizes still grow onnxruntime's memory arena to the batches it will see)."""
        for b in self.buckets:
            tokens = np.zeros((b, num_fields), dtype=np.int64)
            for _ in range(runs):
                self._run(tokens)

    def score(self, tokens: np.ndarray) -> np.ndarray:
        """Probabilities for tokens [rows, F]; when padding, pads to a bucket and trims it off."""
        rows = tokens.shape[0]
        if rows == 0:
            return np.empty(0, dtype=np.float32)
        size = self.bucket_for(rows) if self.pad else rows
        if size != rows:
            padded = np.zeros((size, tokens.shape[1]), dtype=np.int64)  # PAD_ID == 0
            padded[:rows] = tokens
            tokens = padded
        return self._run(np.ascontiguousarray(tokens, dtype=np.int64))[:rows]

    def _run(self, tokens: np.ndarray) -> np.ndarray:
        if self.use_iobinding:
            return self._run_bound(tokens)
        return self.session.run([self.output_name], {self.input_name: tokens})[0].reshape(-1)

    def _run_bound(self, tokens: np.ndarray) -> np.ndarray:
        """CUDA path: copy the input once to the device, let onnxruntime place the output there,
        and copy only the probabilities back (no per-run host staging of intermediate buffers)."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(tokens, "cuda", 0))
        binding.bind_output(self.output_name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].reshape(-1)
