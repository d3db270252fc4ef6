"""Which onnxruntime execution providers to ask for, decided once per process.

`onnxruntime-gpu` lists CUDAExecutionProvider as available whether or not CUDA can load: on
a host without the CUDA libraries, the first session that asks for it logs a red
`libonnxruntime_providers_cuda.so ... libcublasLt` error and then falls back to CPU. That
alarms a new user for nothing, and says nothing useful to an operator. So a provider that
needs a GPU is only asked for when it can load: the driver must answer with at least one
device, and a quiet probe session (onnxruntime's own logging silenced) must really get the
provider. The decision is logged once, at INFO, with the provider in use and why.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
from collections.abc import Sequence
from functools import lru_cache

from model.logs import kv

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
# Providers that need the NVIDIA driver and a device; the rest (CPU, OpenVINO...) are kept as asked.
GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})
_ORT_SILENT = 4  # onnxruntime's FATAL: nothing below it reaches stderr


def choose_providers(requested: Sequence[str]) -> list[str]:
    """The requested providers this host can run, in the requested order, CPU always last."""
    return list(_choose(tuple(requested)))


@lru_cache(maxsize=None)
def _choose(requested: tuple[str, ...]) -> tuple[str, ...]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    wanted = [p for p in requested if p in available]
    absent = [p for p in requested if p not in available]
    reason = f"not in this onnxruntime build: {','.join(absent)}" if absent else "requested"
    gpu = [p for p in wanted if p in GPU_PROVIDERS]
    if gpu:
        devices, why = cuda_devices()
        if devices == 0:
            wanted, reason = [p for p in wanted if p not in GPU_PROVIDERS], why
        else:
            loaded, why = _probe(tuple(gpu))
            if not loaded:
                wanted, reason = [p for p in wanted if p not in GPU_PROVIDERS], why
            else:
                wanted = [p for p in wanted if p not in GPU_PROVIDERS or p in loaded]
    if CPU not in wanted:
        wanted.append(CPU)
    log.info("onnxruntime_providers %s", kv(provider=wanted[0], providers=",".join(wanted), reason=reason,
                                             requested=",".join(requested) or "-"))
    return tuple(wanted)


def cuda_devices() -> tuple[int, str]:
    """How many CUDA devices the driver reports (0 with the reason when none or no driver).

    Asks libcuda directly through ctypes, which neither prints nor needs the CUDA toolkit.
    """
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no NVIDIA driver (libcuda.so.1 not found)"
    if cuda.cuInit(0) != 0:
        return 0, "the NVIDIA driver found no usable device (cuInit failed)"
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return 0, "the NVIDIA driver reports no CUDA device"
    return count.value, f"{count.value} CUDA device(s)"


def _probe(gpu_providers: tuple[str, ...]) -> tuple[set[str], str]:
    """Open a one-node session with the GPU providers, onnxruntime's logging silenced, and
    return the ones it really got. CUDA libraries installed as pip wheels (nvidia-*) are
    preloaded first, as onnxruntime documents; its preload prints, so that is captured."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
            preload()
    ort.set_default_logger_severity(_ORT_SILENT)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = _ORT_SILENT
        session = ort.InferenceSession(_identity_model(), sess_options=opts, providers=[*gpu_providers, CPU])
        got = set(session.get_providers()) & set(gpu_providers)
    except Exception as exc:  # a provider that raises instead of falling back
        return set(), f"{gpu_providers[0]} failed to start: {type(exc).__name__}"
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default, WARNING
    if not got:
        return set(), f"{gpu_providers[0]} cannot load (CUDA or cuDNN libraries missing or mismatched)"
    return got, "GPU provider loads"


def _identity_model() -> bytes:
    """The smallest valid ONNX graph (float Identity), serialised."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()
