"""Export a trained run to an ONNX model package.

Pipeline: torch.onnx.export(dynamo=True) of sigmoid(model(tokens)) with a dynamic batch axis
-> onnxruntime graph optimisation saved at the BASIC level -> parity against torch (fp32,
max abs diff <= 1e-5) -> optional fp16 / int8 variant, scored on the validation split
against fp32 -> atomic publish through `export.package.write_package`.

Why BASIC and not EXTENDED/ALL when saving: BASIC rewrites (constant folding, redundant node
removal, standard-op fusions) keep the graph in the standard ONNX domain, so the saved file
passes onnx.checker, runs on every execution provider (CPU, CUDA, TensorRT) and can still
be converted to fp16 or quantised. EXTENDED fusions produce com.microsoft contrib ops that
only some providers implement, and ALL adds layout rewrites tied to the CPU that ran the
optimiser. onnxruntime applies EXTENDED/ALL itself when the service opens the session, on
the hardware it actually runs on, so saving BASIC loses nothing at serving time.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from export.package import ModelPackage, graph_io, graph_opset, write_package
from export.parity import FP32_ATOL, ParityReport, ProbabilityHead, check_parity
from model.logs import kv
from model.spec import FeatureSpec

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
# Reduced precision cannot meet the fp32 bound; these only catch a broken conversion. The
# validation AUC change is the number that decides whether a variant is good enough.
VARIANT_SANITY_ATOL = {"fp16": 5e-3, "int8": 5e-2}
EXAMPLE_BATCH = 4  # >= 2, so the exporter cannot specialise the batch axis to 1


@dataclass(frozen=True)
class ExportOptions:
    precision: Precision = "fp32"
    opset: int | None = None  # None: the exporter's default opset
    optimization: Literal["basic", "none"] = "basic"
    parity_atol: float = FP32_ATOL
    valid_data: str | Path | None = None  # data dir or file; default: the run's data dir
    eval_rows: int = 200_000  # validation rows scored when comparing a variant with fp32


def exporter_version() -> str:
    try:
        return importlib_metadata.version("ctr-serve")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------- graph steps
def export_onnx(model: torch.nn.Module, spec: FeatureSpec, out_path: str | Path, *, opset: int | None = None) -> Path:
    """tokens int64 [batch, F] -> probability float32 [batch], batch axis dynamic."""
    from export.package import random_valid_tokens

    head = ProbabilityHead(model).eval()
    example = torch.from_numpy(random_valid_tokens(spec, EXAMPLE_BATCH, np.random.default_rng(0)))
    batch = torch.export.Dim("batch", min=1)
    kwargs: dict[str, Any] = {}
    if opset is not None:
        kwargs["opset_version"] = int(opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        _quiet_exporter_logs()
        program = torch.onnx.export(
            head,
            (example,),
            dynamo=True,
            dynamic_shapes={"tokens": {0: batch}},
            input_names=["tokens"],
            output_names=["probability"],
            external_data=False,
            verbose=False,
            **kwargs,
        )
    out = Path(out_path)
    program.save(str(out))
    return out


def _quiet_exporter_logs() -> None:
    """The exporter and its optimiser log every folding step at INFO and warn once per missing
    optional op library (torchvision); none of it is actionable for a user of `ctr export`."""
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def _root_log_level(level: int) -> Iterator[None]:
    """onnxruntime.quantization logs per-tensor chatter through the root logger."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(max(old, level))
    try:
        yield
    finally:
        root.setLevel(old)


def optimize_onnx(src: str | Path, dst: str | Path, level: Literal["basic", "none"] = "basic") -> Path:
    """Save onnxruntime's BASIC-level optimised graph (see the module docstring for why BASIC)."""
    import onnxruntime as ort

    dst = Path(dst)
    if level == "none":
        dst.write_bytes(Path(src).read_bytes())
        return dst
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    opts.intra_op_num_threads = 1
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return dst


def to_fp16(src: str | Path, dst: str | Path) -> Path:
    """Weights and activations in fp16 for GPU; int64 tokens in and float32 probability out."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    converted = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(dst))
    return Path(dst)


def to_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantisation for CPU: embedding tables (Gather) and MatMul weights.

    The exporter emits Gemm for 2-D Linear layers, which dynamic quantisation skips, so Gemm
    nodes with constant weights are first rewritten as MatMul + Add (same maths).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    _gemm_to_matmul(model)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        onnx.save(model, str(pre))
        with _root_log_level(logging.ERROR):
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"])
    return Path(dst)


def _gemm_to_matmul(model: Any) -> None:
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    new_nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        simple = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not simple or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            w = np.ascontiguousarray(w.T)
        w_name = f"{node.input[1]}__matmul"
        model.graph.initializer.append(numpy_helper.from_array(w, w_name))
        if len(node.input) > 2 and node.input[2]:
            mm_out = f"{node.output[0]}__mm"
            new_nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=f"{node.name}_matmul"))
            new_nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        else:
            new_nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [node.output[0]], name=f"{node.name}_matmul"))
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


# ---------------------------------------------------------------------- evaluation
def _session(path: str | Path, providers: list[str] | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def _score(sess: Any, tokens: np.ndarray, chunk: int = 8192) -> np.ndarray:
    name_in, name_out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    return np.concatenate([sess.run([name_out], {name_in: tokens[i : i + chunk]})[0] for i in range(0, len(tokens), chunk)])


def _auc_logloss(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import log_loss, roc_auc_score

    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(roc_auc_score(labels, p)), float(log_loss(labels, p, labels=[0, 1]))


def load_valid_tokens(spec: FeatureSpec, valid_data: str | Path, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
    from model.readers import read_table, split_path

    src = Path(valid_data)
    table = read_table(split_path(src, "valid") if src.is_dir() else src)
    if len(table) > max_rows:
        table = table.sample(n=max_rows, random_state=0)
    return spec.encode(table, strict=True), table[spec.label].to_numpy().astype(np.int64)


def compare_precision(fp32_path: Path, variant_path: Path, precision: str, spec: FeatureSpec, valid_data: str | Path | None, max_rows: int) -> dict[str, Any]:
    """AUC / logloss of the variant vs fp32 on the validation split (both through onnxruntime)."""
    if valid_data is None:
        return {"split": None, "note": "no validation data found; pass --valid-data to measure the AUC change"}
    tokens, labels = load_valid_tokens(spec, valid_data, max_rows)
    p32 = _score(_session(fp32_path), tokens)
    try:
        pv = _score(_session(variant_path), tokens)
        provider = "CPUExecutionProvider"
    except Exception as exc:  # fp16 kernels are missing for some ops on CPU builds
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return {"split": "valid", "rows": int(len(tokens)), "note": f"{precision} cannot run here: {exc}"}
        sess = _session(variant_path, ["CUDAExecutionProvider", "CPUExecutionProvider"])
        provider = sess.get_providers()[0]
        pv = _score(sess, tokens)
    auc32, ll32 = _auc_logloss(labels, p32)
    aucv, llv = _auc_logloss(labels, pv)
    return {
        "split": "valid",
        "rows": int(len(tokens)),
        "provider": provider,
        "auc_fp32": auc32,
        "auc": aucv,
        "auc_delta": aucv - auc32,
        "logloss_fp32": ll32,
        "logloss": llv,
        "logloss_delta": llv - ll32,
        "max_abs_diff_vs_fp32": float(np.max(np.abs(pv.astype(np.float64) - p32))),
    }


# ---------------------------------------------------------------------- the whole export
def export_model(
    model: torch.nn.Module,
    spec: FeatureSpec,
    repo: str | Path,
    name: str,
    *,
    model_type: str,
    metrics: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    version: int | None = None,
    options: ExportOptions = ExportOptions(),
    source_run: str | None = None,
) -> ModelPackage:
    """Export an in-memory network (eval mode) with its fitted spec and publish it."""
    import onnx

    if options.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {options.precision!r}")
    model = model.eval()
    config = config or {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ctr-export-") as tmp:
        work = Path(tmp)
        raw = export_onnx(model, spec, work / "raw.onnx", opset=options.opset)
        fp32 = optimize_onnx(raw, work / "fp32.onnx", options.optimization)
        parity = check_parity(model, fp32, spec, atol=options.parity_atol)
        chosen, variant_parity, precision_eval = fp32, None, None
        if options.precision != "fp32":
            chosen = (to_fp16 if options.precision == "fp16" else to_int8)(fp32, work / f"{options.precision}.onnx")
            variant_parity = _variant_parity(model, chosen, spec, options.precision)
            precision_eval = compare_precision(fp32, chosen, options.precision, spec, _valid_source(options, config), options.eval_rows)
            precision_eval["fp32_onnx_bytes"] = fp32.stat().st_size
            _print_precision(options.precision, precision_eval, chosen.stat().st_size)
        graph = onnx.load(str(chosen))
        inputs, outputs = graph_io(graph)
        metadata: dict[str, Any] = {
            "name": name,
            "model_type": model_type,
            "precision": options.precision,
            "metrics": metrics or {},
            "data_fingerprint": _data_fingerprint(config),
            "opset": graph_opset(graph),
            "inputs": inputs,
            "outputs": outputs,
            "optimization": f"onnxruntime {options.optimization}",
            "parity": parity.as_dict(),
            "exporter_version": exporter_version(),
            "torch_version": torch.__version__,
            "source_run": source_run,
            # The post-hoc map already inside the graph (None: raw network probabilities).
            "calibration": config.get("calibration"),
        }
        if variant_parity is not None:
            metadata["variant_parity"] = variant_parity.as_dict()
            metadata["precision_eval"] = precision_eval
        pkg = write_package(repo, name, chosen, spec, metadata, version=version)
    log.info(
        "exported %s",
        kv(name=pkg.name, version=pkg.version, model_type=model_type, precision=options.precision,
           onnx_bytes=pkg.onnx_path.stat().st_size, max_abs_diff=parity.max_abs_diff, seconds=time.perf_counter() - t0),
    )
    return pkg


def _variant_parity(model: torch.nn.Module, path: Path, spec: FeatureSpec, precision: str) -> ParityReport:
    """Reported, not enforced at 1e-5; a gross difference still means a broken conversion."""
    atol = VARIANT_SANITY_ATOL[precision]
    try:
        return check_parity(model, path, spec, atol=atol)
    except Exception as exc:
        if "NOT_IMPLEMENTED" in str(exc) or "Could not find an implementation" in str(exc):
            # fp16 on a CPU-only build: no kernel to run it here; the AUC comparison says so too.
            return ParityReport(float("nan"), float("nan"), 0, (), 0, atol)
        raise


def _print_precision(precision: str, ev: dict[str, Any], size: int) -> None:
    if "auc" in ev:
        line = (f"{precision}: valid AUC {ev['auc']:.6f} vs fp32 {ev['auc_fp32']:.6f} "
                f"(change {ev['auc_delta']:+.6f}), logloss change {ev['logloss_delta']:+.6f}, "
                f"{ev['rows']} rows on {ev['provider']}; model.onnx {size} bytes (fp32 {ev['fp32_onnx_bytes']})")
    else:
        line = f"{precision}: AUC change not measured: {ev.get('note')}"
    print(line)
    log.info("precision eval %s", kv(precision=precision, **{k: v for k, v in ev.items() if not isinstance(v, (dict, list))}))


def _data_fingerprint(config: dict[str, Any]) -> Any:
    """The run's own fingerprint when training recorded one; otherwise a content hash of the
    split files in the run's data directory, marked as computed at export time (it can only
    vouch for the data as it is now, not as it was when the model trained)."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    for src in (data, config):
        for key in ("fingerprint", "data_fingerprint"):
            if src.get(key) is not None:
                return src[key]
    d = data.get("dir")
    if not isinstance(d, str) or not Path(d).is_dir():
        return None
    from model.readers import data_fingerprint

    fp = data_fingerprint(d)
    return None if fp is None else {**fp, "source": "computed at export from config.json data.dir"}


def _valid_source(options: ExportOptions, config: dict[str, Any]) -> Path | None:
    if options.valid_data is not None:
        return Path(options.valid_data)
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    for key in ("valid", "valid_path", "dir", "data_dir", "path", "data"):
        v = data.get(key)
        if isinstance(v, str) and Path(v).exists():
            return Path(v)
    return None


def export_run(
    run_dir: str | Path,
    repo: str | Path,
    name: str,
    version: int | None = None,
    precision: Precision = "fp32",
    *,
    options: ExportOptions | None = None,
) -> ModelPackage:
    """`ctr export`: load a training run directory and publish it as the next package version."""
    from model.run_io import load_run

    opts = options or ExportOptions(precision=precision)  # `options`, when given, decides everything
    run = load_run(run_dir)
    config = dict(run.config or {})
    model_type = str(config.get("model_type") or type(run.model).__name__.lower())
    return export_model(
        run.model,
        run.spec,
        repo,
        name,
        model_type=model_type,
        metrics=_json_safe(run.metrics),
        config=config,
        version=version,
        options=opts,
        source_run=str(Path(run_dir).resolve()),
    )


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str)) if obj is not None else {}


# ---------------------------------------------------------------------- SGCTR refinement graphs
def export_refinement(
    model: torch.nn.Module,
    package_dir: str | Path,
    configs: list[Any],
    *,
    opset: int | None = None,
    optimization: Literal["basic", "none"] = "basic",
    parity_atol: float = FP32_ATOL,
    generator: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export one refinement graph per SGCTR setting (`testtime.sgctr.SgctrConfig`, its R
    included) into a published package, beside model.onnx, and record them in sgctr.json.

    Each graph is tokens int64 [batch, F] -> refined probability float32 [batch], checked
    against the torch `model.refine.Refiner` at the fp32 bound, so the package's plain graph
    and contract are untouched and a package without these files still serves plain. Graphs
    already in the manifest under the same settings and R are replaced; others are kept.
    """
    from export.package import file_sha256, verify_package
    from model.refine import Refiner
    from testtime.sgctr import MANIFEST_FORMAT, SGCTR_MANIFEST, read_manifest

    pkg = verify_package(package_dir, smoke_run=False)
    model = model.eval()
    entries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ctr-sgctr-") as tmp:
        for cfg in configs:
            refiner = Refiner(model, cfg, pkg.spec.field_names).eval()
            t0 = time.perf_counter()
            raw = export_onnx(refiner, pkg.spec, Path(tmp) / "raw.onnx", opset=opset)
            graph = optimize_onnx(raw, Path(tmp) / "opt.onnx", optimization)
            parity = check_parity(refiner, graph, pkg.spec, atol=parity_atol)
            dst = pkg.path / cfg.graph_file()
            dst.parent.mkdir(exist_ok=True)
            part = dst.with_name(f".{dst.name}.part")
            part.write_bytes(graph.read_bytes())
            os.replace(part, dst)
            entries.append({"key": cfg.graph_key(), "passes": cfg.passes, "settings": cfg.graph_settings(),
                            "file": cfg.graph_file(), "sha256": file_sha256(dst), "bytes": dst.stat().st_size,
                            "runs_per_row": cfg.runs_per_row(pkg.spec.num_fields), "parity": parity.as_dict(),
                            "export_seconds": round(time.perf_counter() - t0, 2)})
            log.info("sgctr graph %s", kv(file=cfg.graph_file(), passes=cfg.passes, max_abs_diff=parity.max_abs_diff))
    old = read_manifest(pkg.path) or {"graphs": []}
    new_ids = {(e["key"], e["passes"]) for e in entries}
    kept = [e for e in old["graphs"] if (e.get("key"), e.get("passes")) not in new_ids]
    manifest = {"format": MANIFEST_FORMAT, "feature_spec_sha256": pkg.metadata.get("feature_spec_sha256"),
                "onnx_sha256": pkg.metadata.get("onnx_sha256"), "exporter_version": exporter_version(),
                "generator": generator if generator is not None else old.get("generator"),
                "graphs": kept + entries}
    part = pkg.path / f".{SGCTR_MANIFEST}.part"
    part.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(part, pkg.path / SGCTR_MANIFEST)
    verify_package(pkg.path, smoke_run=False)
    return manifest
