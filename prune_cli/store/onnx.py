"""ONNX export of a model file, and ONNX Runtime sessions that time like a torch module.

The exporter is torch's TorchScript-based one (`dynamo=False`), at opset 17: it exports the zoo's and torchvision's
CNNs in about 3 s on a 2-core CPU, where the dynamo exporter took about 4x longer, and it needs only `onnx`, not
`onnxscript`, so the optional extra stays two packages. The batch axis is dynamic (input and logits), so one file
serves every batch size. onnx and onnxruntime are the optional extra `prune-cli[onnx]`; without them every entry
point here is one error line naming the extra.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prune_cli.errors import BadModelFile, BadValue, PruneCliError

OPSET = 17


class MissingExtra(PruneCliError):
    """An optional dependency that is not installed."""


def require_onnx() -> tuple[Any, Any]:
    """(onnx, onnxruntime), or MissingExtra naming the extra that installs them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise MissingExtra(
            f"ONNX export and --runtime onnxruntime need the optional extra 'onnx' ({exc.name} is not installed): "
            "pip install 'prune-cli[onnx]'"
        ) from None
    return onnx, onnxruntime


def to_onnx(model: nn.Module, example_input: Tensor, opset: int = OPSET) -> bytes:
    """The ONNX file of `model` (eval mode, on the CPU) for inputs shaped like `example_input` (N, C, H, W), with a
    dynamic batch axis: input "input" (batch, C, H, W) -> output "logits" (batch, classes).

    A dynamic model (HASTE, ManiDP: channels chosen per input) or an operation the exporter cannot record raises
    BadValue in one line."""
    onnx, _ = require_onnx()
    from prune_cli.api import dynamic

    if dynamic.is_dynamic(model):
        raise BadValue(
            "a dynamic model (its channels are chosen per input, by a Python loop over gates) cannot be exported to "
            "ONNX; prune it to a static model first (e.g. ManiDP's static_below)"
        )
    model = model.eval()
    x = example_input[:1].detach().to(next(model.parameters()).device)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation notices are not the user's business
            torch.onnx.export(
                model, (x,), buffer, dynamo=False, opset_version=opset, input_names=["input"],
                output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )  # fmt: skip
    except Exception as exc:  # the exporter raises many kinds; any of them means "this model cannot be exported"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadValue(f"the model cannot be exported to ONNX: {first[:300]}") from exc
    data = buffer.getvalue()
    try:
        onnx.checker.check_model(onnx.load_from_string(data))
    except Exception as exc:
        raise BadModelFile(f"the exported ONNX graph does not pass onnx's checker: {exc}") from exc
    return data


def session(data: bytes, threads: int | None = None):
    """An ONNX Runtime CPU session of `data` with `threads` intra-op threads (default: torch's thread count, so that
    the two runtimes are timed on the same cores)."""
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


class OrtModel:
    """`model` exported and run by ONNX Runtime: called like the module on a (N, C, H, W) CPU tensor, returns the
    (N, classes) logits as a tensor. `metrics.measure_latency` times it as it times a module."""

    def __init__(self, model: nn.Module, example_input: Tensor, threads: int | None = None):
        if example_input.device.type != "cpu":
            raise BadValue("--runtime onnxruntime runs on the CPU here: use --device cpu")
        self.session = session(to_onnx(model, example_input), threads)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x.detach().cpu().numpy())})[0]
        return torch.from_numpy(out)


@torch.no_grad()
def agreement(model: nn.Module, sess, x: Tensor, batch: int = 250) -> dict[str, Any]:
    """Predictions of torch and ONNX Runtime on images `x` (N, C, H, W), in batches of `batch` (the dynamic axis):
    how many agree, and the largest absolute logit difference."""
    model = model.eval()
    device = next(model.parameters()).device
    equal, worst = 0, 0.0
    name = sess.get_inputs()[0].name
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        ref = model(xb.to(device)).float().cpu()
        got = torch.from_numpy(sess.run(None, {name: np.ascontiguousarray(xb.cpu().numpy())})[0])
        equal += int((ref.argmax(1) == got.argmax(1)).sum())
        worst = max(worst, float((ref - got).abs().max()))
    return {"images": len(x), "equal_predictions": equal, "max_abs_logit_diff": worst}
