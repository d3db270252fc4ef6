"""The scorer runs exact shapes on CPU and pads to buckets only when asked (the CUDA default),
with the same probabilities either way, from a real onnxruntime session."""

from __future__ import annotations

import numpy as np
import pytest

from service.scorer import Scorer
from tests.testing import tiny_onnx, tiny_reference


@pytest.fixture(scope="module")
def model(synth_spec, tmp_path_factory):
    path = tmp_path_factory.mktemp("scorer") / "model.onnx"
    return path, tiny_onnx(synth_spec, path, seed=3)


def _shapes(scorer: Scorer) -> list[int]:
    """Record the batch sizes the session is run with (the real run still happens)."""
    seen: list[int] = []
    run = scorer._run

    def recording(tokens):
        seen.append(tokens.shape[0])
        return run(tokens)

    scorer._run = recording  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("pad", [None, False, True])
def test_padding_only_when_asked_and_scores_are_the_same(model, synth_spec, pad):
    path, weights = model
    scorer = Scorer(path, ["CPUExecutionProvider"], 1, 1, [1, 16, 128, 512], pad=pad)
    assert scorer.provider == "CPUExecutionProvider"
    assert scorer.pad is (pad is True)  # None means: pad on CUDA only
    seen = _shapes(scorer)
    rng = np.random.default_rng(0)
    for n in (1, 7, 100, 129, 513):
        tokens = np.stack([rng.integers(0, v, n) for v in synth_spec.vocab_sizes], axis=1).astype(np.int64)
        np.testing.assert_allclose(scorer.score(tokens), tiny_reference(weights, tokens), atol=1e-6)
    assert seen == ([1, 16, 128, 512, 513] if pad else [1, 7, 100, 129, 513])
    assert scorer.score(np.empty((0, synth_spec.num_fields), np.int64)).shape == (0,)
