"""Ship a trained network as one ONNX file, batch norm folded away, checked in onnxruntime.

:func:`to_onnx` (or :func:`export_checkpoint` for a saved checkpoint) does, in order:

1. folds every BN layer it can into a Conv/Linear neighbour with :func:`bnlab.nn.fold_batchnorm`
   (a BN that cannot fold stays in the graph, as a ``BatchNormalization`` node unless the
   exporter's own optimizer merges it; the report says which BN stayed and why);
2. with ``bake_standardization`` (the default) puts a :class:`Standardize` layer in front, doing
   what the training data's :class:`~bnlab.data.Standardizer` did, so the file takes raw input;
3. exports with ``torch.onnx.export(dynamo=True)`` with a dynamic batch dimension ``N`` (the
   TorchScript exporter only if that fails), and writes what a user needs into the model's
   ``metadata_props``;
4. runs 256 inputs through the written file in onnxruntime and through the original (unfolded)
   network in PyTorch, and keeps the file only if every logit agrees within ``tolerance`` and
   every top-1 class is the same; else :class:`ExportError` and no file.

The input the file takes (its first and only input; the output is ``logits``, ``(N, classes)``):

- images, standardization baked in: ``pixels``, float32 ``(N, C, H, W)``, raw pixel values
  0..255 (uint8 images cast to float32, channels first, as bnlab's datasets hold them);
- feature tables, baked: ``features``, float32 ``(N, F)``, the raw feature values;
- ``bake_standardization=False``: ``standardized``, float32, ``z = (x - mean[c]) / std[c]`` per
  channel ``c`` (``mode`` ``none``: ``z = x``), with ``mode``, ``mean`` and ``std`` from the
  ``standardization`` metadata entry, in raw units (0..255 for images). No JSON sidecar: the one
  ``.onnx`` file carries it all.

Metadata entries (strings; JSON where structured): ``classes`` (a list of class names, indexed
by output), ``input`` (the description above for this file), ``standardization`` (``mode``,
``mean``, ``std``, ``baked``), ``bnlab_version``, ``batchnorm_folding`` (the fold report:
``folded`` and ``left`` rows), plus any ``metadata`` the caller passes. Reading them back::

    import json, numpy as np, onnxruntime as ort
    sess = ort.InferenceSession("model.onnx")
    classes = json.loads(sess.get_modelmeta().custom_metadata_map["classes"])
    logits = sess.run(None, {"pixels": images.astype(np.float32)})[0]   # images: uint8 (N, 1, 28, 28)
    print([classes[i] for i in logits.argmax(1)])

Needs the ``export`` extra (onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from bnlab import __version__
from bnlab._files import atomic_path, check_writable
from bnlab.data import Dataset, Standardizer
from bnlab.errors import BnlabError, ConfigError
from bnlab.nn import FoldReport, backend_name, convert, fold_batchnorm, is_batchnorm, set_backend

if TYPE_CHECKING:
    from bnlab.train import Checkpoint

__all__ = ["to_onnx", "export_checkpoint", "ExportReport", "ExportError", "Standardize"]

#: How many inputs the export-time check runs through both PyTorch and onnxruntime.
CHECK_EXAMPLES = 256
#: The seed of the random check inputs used when no dataset is given.
CHECK_SEED = 0
OUTPUT_NAME = "logits"
BATCH_DIM = "N"
MISSING_EXTRA = "bnlab export needs the export extra: pip install 'bnlab[export]'"


class ExportError(BnlabError):
    """The network could not be exported, or the exported file does not compute what it computes.

    Raised by :func:`to_onnx` and :func:`export_checkpoint`; no file is written then. The message
    names the exporter's error, or the largest logit difference and how many top-1 classes differ.

    Example::

        try:
            to_onnx(net, "model.onnx", input_shape=(1, 28, 28))
        except ExportError as e:
            print(f"not exported: {e}")
    """


class Standardize(nn.Module):
    """The map of a :class:`~bnlab.data.Standardizer` as a layer: ``(x - mean[c]) * (1 / std[c])``.

    Uses the standardizer's own float32 ``mean`` and ``1 / std`` tensors and the same two
    operations, so it gives the standardizer's results bit for bit. ``x`` is ``(N, C, ...)`` in
    raw units (0..255 for images); ``channel_dims`` is the number of dims after the batch dim.

    Args:
        standardizer: the training data's :class:`~bnlab.data.Standardizer` (mode ``none``
            gives the identity).
        channel_dims: ``len(input_shape)``: 3 for ``(C, H, W)`` images, 1 for ``(F,)`` features.

    Example::

        ck = bnlab.train.load_checkpoint("model.pt")
        raw_net = nn.Sequential(Standardize(ck.standardizer, len(ck.input_shape)), ck.model)
        raw_net(images.float())   # images: uint8 (N, *ck.input_shape), pixel values 0..255
    """

    def __init__(self, standardizer: Standardizer, channel_dims: int):
        super().__init__()
        mean, inv = standardizer._mean_inv  # the standardizer's own numbers, not re-derived
        shape = (1, -1) + (1,) * (channel_dims - 1)
        self.register_buffer("mean", mean.clone().view(shape))
        self.register_buffer("inv_std", inv.clone().view(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


@dataclass(repr=False)
class ExportReport:
    """What :func:`to_onnx` wrote and how well it matched PyTorch.

    ``input_shape`` is the ONNX input shape, ``"N"`` for the batch dim; ``max_abs_diff`` is the
    largest |onnxruntime - PyTorch| logit over the ``checked`` inputs, ``top1_agree`` how many of
    them got the same top-1 class; ``batchnorm_nodes`` counts ``BatchNormalization`` nodes in the
    file; ``folded``/``left`` are the rows of the :class:`~bnlab.nn.FoldReport`; ``file_size`` in
    bytes. ``str(report)`` is the summary ``bnlab export`` prints; ``to_dict()`` gives plain values.

    Example::

        report = export_checkpoint(bnlab.train.load_checkpoint("model.pt"), "model.onnx")
        print(report)
        report.input_name, report.top1_agreement   # ('pixels', '256/256') for an image model
    """

    path: str
    input_name: str
    input_shape: tuple
    input_description: str
    opset: int
    exporter: str
    baked: bool
    standardization: dict
    checked: int
    check_source: str
    max_abs_diff: float
    top1_agree: int
    tolerance: float
    batchnorm_nodes: int
    folded: list[dict] = field(default_factory=list)
    left: list[dict] = field(default_factory=list)
    file_size: int = 0

    @property
    def top1_agreement(self) -> str:
        """``"256/256"``: inputs with the same top-1 class in onnxruntime and PyTorch."""
        return f"{self.top1_agree}/{self.checked}"

    def to_dict(self) -> dict:
        """Every field as plain values (``input_shape`` a list), plus ``top1_agreement``."""
        return {**asdict(self), "input_shape": list(self.input_shape), "top1_agreement": self.top1_agreement}

    def __str__(self) -> str:
        lines = [f"wrote {self.path} ({self.file_size / 1024:.1f} KiB, ONNX opset {self.opset}, "
                 f"{self.exporter} exporter)",
                 f"input {self.input_description}",
                 f"folded {len(self.folded)} BN layer(s), left {len(self.left)}; "
                 f"{self.batchnorm_nodes} BatchNormalization node(s) in the file"]
        lines += [f"  {r['bn']} left: {r['reason']}" for r in self.left]
        lines.append(f"checked on {self.check_source}: max |diff| {self.max_abs_diff:.1e} "
                     f"(tolerance {self.tolerance:.0e}), top-1 agreement {self.top1_agreement}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"ExportReport({self.path!r}, input {self.input_name!r}, opset {self.opset}, "
                f"max |diff| {self.max_abs_diff:.1e}, top-1 {self.top1_agreement}, "
                f"{self.batchnorm_nodes} BN node(s))")


def _require_extra():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401 - the dynamo exporter needs it
    except ImportError as e:
        raise ConfigError(f"{MISSING_EXTRA} ({e.name or 'a package'} is not installed)") from None
    return onnx, onnxruntime


def to_onnx(model: nn.Module, path: str | Path, *, input_shape, standardizer: Standardizer | None = None,
            classes: list[str] | None = None, bake_standardization: bool = True, check_data: Dataset | None = None,
            opset: int | None = None, tolerance: float = 1e-4, metadata: dict | None = None) -> ExportReport:
    """Export ``model`` to the ONNX file ``path``, BN folded, checked in onnxruntime (see the module docstring).

    Args:
        model: the trained float32 network (any mode: it is copied, and exported and checked in
            eval mode; the original is not changed).
        path: the ``.onnx`` file to write (atomically: all or nothing).
        input_shape: one example's shape, e.g. ``(1, 28, 28)``.
        standardizer: what maps raw data to the network's inputs (the training data's, e.g.
            ``checkpoint.standardizer``); ``None``: the network takes raw data.
        classes: class names indexed by output; ``None``: ``"0"``, ``"1"``, ...
        bake_standardization: put the standardization inside the graph, so the file takes raw
            input (``pixels``); ``False``: the file takes ``standardized`` input.
        check_data: a :class:`~bnlab.data.Dataset` whose first 256 raw examples (its ``x``;
            ``standardizer`` standardizes them, not the dataset's own) check the file; ``None``:
            256 random inputs (fixed seed; uniform integers 0..255 for images, the standardizer's
            mean and std for feature tables).
        opset: the ONNX opset; ``None``: the exporter's recommended one (the report says which).
        tolerance: the largest |onnxruntime - PyTorch| allowed on any logit.
        metadata: extra ``metadata_props`` entries (values that are not strings are written as JSON).

    Returns:
        An :class:`ExportReport`.

    Raises:
        ExportError: the exporter failed, or the file disagrees with PyTorch beyond
            ``tolerance`` or on a top-1 class; nothing is written then.
        ConfigError: the ``export`` extra is missing, ``path`` cannot be written, or an argument
            does not fit the model.

    Example::

        train, test = bnlab.data.load_splits("digits")
        net = bnlab.models.build("keras-mlp", bn="after", input_shape=train.input_shape, num_classes=10)
        bnlab.train.fit(net, train, test, batch_size=64, epochs=3)
        report = to_onnx(net, "digits.onnx", input_shape=train.input_shape, standardizer=train.standardizer,
                         classes=train.classes, check_data=test)
        report.folded   # one row per BN layer: which Linear it was merged into
    """
    onnx, ort = _require_extra()
    path = check_writable(path, "ONNX file")
    input_shape = tuple(int(d) for d in input_shape)
    if not tolerance >= 0:
        raise ConfigError(f"tolerance must be 0 or more, got {tolerance}")
    standardizer = standardizer or Standardizer()
    if standardizer.mode != "none" and len(standardizer.mean) != input_shape[0]:
        raise ConfigError(f"the standardizer has {len(standardizer.mean)} channel(s) but input shape {input_shape} "
                          f"has {input_shape[0]}: pass the standardizer of the data the network was trained on")

    # 1. fold; the outputs to match are the original network's, in eval mode
    reference = copy.deepcopy(model).float().cpu().eval()
    folded, fold_report = _fold(reference)
    raw, check_source = _check_inputs(check_data, input_shape, standardizer)
    with torch.no_grad():
        expected = reference(standardizer(raw))
    classes = [str(c) for c in classes] if classes is not None else [str(i) for i in range(expected.shape[1])]
    if len(classes) != expected.shape[1]:
        raise ConfigError(f"{len(classes)} class names for a network with {expected.shape[1]} outputs")

    # 2. the standardization inside the graph, or left to the user
    if bake_standardization:
        input_name = "pixels" if len(input_shape) == 3 else "features"
        net, feed = folded, raw
        if standardizer.mode != "none":
            net = nn.Sequential(Standardize(standardizer, len(input_shape)), folded)
    else:
        input_name, net, feed = "standardized", folded, standardizer(raw)
    description = _describe_input(input_name, input_shape, standardizer, bake_standardization)

    # 3. export (an example batch of 2: torch.export treats a batch of 1 as a fixed size)
    proto, exporter = _export(net.eval(), feed[:1].repeat((2,) + (1,) * len(input_shape)), input_name, opset)
    proto.graph.input[0].doc_string = description
    _drop_stack_traces(proto)
    del proto.metadata_props[:]
    for key, value in {
        "classes": json.dumps(classes),
        "input": description,
        "standardization": json.dumps({**standardizer.to_dict(), "baked": bool(bake_standardization)}),
        "bnlab_version": __version__,
        "batchnorm_folding": json.dumps(fold_report.to_dict()),
        **{str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()},
    }.items():
        proto.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported model of {type(model).__name__} fails onnx.checker: {_first_line(e)}") from e

    # 4. the check, on the bytes that will ship
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
        diff, agree = _compare_in_onnxruntime(ort, tmp, input_name, feed, expected)
        if not (diff <= tolerance and agree == len(raw)):
            raise ExportError(f"the exported model disagrees with PyTorch on {check_source}: max |diff| {diff:.3g} "
                              f"(tolerance {tolerance:g}), top-1 class differs on {len(raw) - agree}/{len(raw)} "
                              f"inputs; nothing written to {path}")
        size = tmp.stat().st_size

    shape = (BATCH_DIM, *input_shape)
    return ExportReport(
        path=str(path), input_name=input_name, input_shape=shape, input_description=description,
        opset=next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), exporter=exporter,
        baked=bool(bake_standardization), standardization=standardizer.to_dict(), checked=len(raw),
        check_source=check_source, max_abs_diff=diff, top1_agree=agree, tolerance=tolerance,
        batchnorm_nodes=_count_nodes(proto, "BatchNormalization"), folded=fold_report.folded, left=fold_report.left,
        file_size=size)


def export_checkpoint(ck: Checkpoint, path: str | Path, *, bake_standardization: bool = True,
                      check_data: Dataset | None = None, opset: int | None = None,
                      tolerance: float = 1e-4) -> ExportReport:
    """:func:`to_onnx` for a loaded :class:`bnlab.train.Checkpoint`: its network, input shape,
    standardizer and class names. The metadata also names the network (spec name and BN
    placement) and the dataset it was trained on; no local paths from the settings.

    Args:
        ck: the checkpoint (:func:`bnlab.train.load_checkpoint`; a folded one works too).
        path: the ``.onnx`` file to write.
        bake_standardization, check_data, opset, tolerance: as for :func:`to_onnx`; ``check_data``
            is raw (its own standardization is ignored: the checkpoint's is used).

    Returns:
        An :class:`ExportReport`.

    Raises:
        ExportError, ConfigError: as for :func:`to_onnx`.

    Example::

        ck = bnlab.train.load_checkpoint("model.pt")
        test = bnlab.data.load(ck.settings["dataset"], "test")
        print(export_checkpoint(ck, "model.onnx", check_data=test))
    """
    extra = {"model": f"{ck.spec.get('name', '?')} bn={ck.build.get('bn', '?')}"}
    if ck.settings.get("dataset"):
        extra["trained_on"] = str(ck.settings["dataset"])
    return to_onnx(ck.model, path, input_shape=ck.input_shape, standardizer=ck.standardizer, classes=ck.classes,
                   bake_standardization=bake_standardization, check_data=check_data, opset=opset,
                   tolerance=tolerance, metadata=extra)


def _fold(model: nn.Module) -> tuple[nn.Module, FoldReport]:
    """The folded network, with torch's BN layers in place of bnlab's that stay (they export as
    ``BatchNormalization`` nodes; bnlab's compiled kernels cannot be traced)."""
    try:
        folded, report = fold_batchnorm(model)
    except ConfigError as e:  # a bare layer, or a network torch.fx cannot trace: export it unfolded
        folded, reason = copy.deepcopy(model), f"not folded: {str(e).split(':')[0]}"
        report = FoldReport(left=[{"bn": name, "reason": reason}
                                  for name, m in model.named_modules() if is_batchnorm(m)])
    return convert(folded, to="torch").eval(), report


def _check_inputs(data: Dataset | None, input_shape: tuple, standardizer: Standardizer) -> tuple[torch.Tensor, str]:
    """Raw float32 check inputs and where they come from."""
    if data is not None:
        if tuple(data.input_shape) != input_shape:
            raise ConfigError(f"check data {data.name}/{data.split} has examples of shape {tuple(data.input_shape)}, "
                              f"the network takes {input_shape}")
        x = data.x[:CHECK_EXAMPLES].float()
        kind = "images" if data.is_image else "examples"
        return x, f"the first {len(x)} {data.name}/{data.split} {kind}"
    g = torch.Generator().manual_seed(CHECK_SEED)
    shape = (CHECK_EXAMPLES, *input_shape)
    if len(input_shape) == 3:
        return torch.randint(0, 256, shape, generator=g).float(), f"{CHECK_EXAMPLES} random images (seed {CHECK_SEED})"
    mean = torch.tensor(standardizer.mean if standardizer.mode != "none" else (0.0,))
    std = torch.tensor(standardizer.std if standardizer.mode != "none" else (1.0,))
    x = mean + std * torch.randn(shape, generator=g, dtype=torch.float64)
    return x.float(), f"{CHECK_EXAMPLES} random inputs (seed {CHECK_SEED})"


def _compare_in_onnxruntime(ort, file: Path, input_name: str, feed: torch.Tensor,
                            expected: torch.Tensor) -> tuple[float, int]:
    """``(max |diff|, top-1 agreements)`` of the file's logits against ``expected``. The first
    input also runs alone: the batch dimension must really be dynamic."""
    try:
        session = ort.InferenceSession(str(file), _session_options(ort), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {input_name: feed.numpy()})[0])
        got_one = torch.from_numpy(session.run(None, {input_name: feed[:1].numpy()})[0])
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors share no base class worth naming
        raise ExportError(f"onnxruntime cannot run the exported model: {_first_line(e)}") from e
    diff = max((got.double() - expected.double()).abs().max().item(),
               (got_one.double() - expected[:1].double()).abs().max().item())
    return diff, int((got.argmax(1) == expected.argmax(1)).sum())


def _describe_input(name: str, input_shape: tuple, s: Standardizer, baked: bool) -> str:
    is_image = len(input_shape) == 3
    dims = {3: "(N, C, H, W) = ", 1: "(N, F) = "}.get(len(input_shape), "")
    head = f"{name}: float32 {dims}({', '.join([BATCH_DIM, *map(str, input_shape)])}), "
    raw = "raw pixel values 0..255 (uint8 images cast to float32)" if is_image else "raw feature values"
    if baked:
        inside = "the graph standardizes them itself" if s.mode != "none" else "fed to the network as they are"
        return f"{head}{raw}; {inside} ({s.mode})"
    if s.mode == "none":
        return f"{head}{raw} (standardization mode none: nothing to apply)"
    return (f"{head}standardized inputs z = (x - mean[c]) / std[c] per channel c, x being {raw}; "
            f"mode, mean and std in the 'standardization' entry")


@contextlib.contextmanager
def _quiet_exporter():
    # torch.onnx and torch.export log, warn and print (to stderr) things that do not concern the
    # user: torchvision ops skipped, deprecations inside torch, the graph of a failed attempt
    # before the next one. The check in onnxruntime is what vouches for the file.
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


@contextlib.contextmanager
def _traceable_batchnorm(net: nn.Module):
    """bnlab's BN variants left in ``net`` (no torch twin to convert to) run on the plain-ops backend,
    which the exporter can trace, for the duration of the export."""
    if not any(is_batchnorm(m) and not isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        yield
        return
    before = backend_name()
    set_backend("eager")
    try:
        yield
    finally:
        set_backend(before)


def _export(net: nn.Module, example: torch.Tensor, input_name: str, opset: int | None):
    """``(onnx.ModelProto, exporter name)``: dynamo first, TorchScript if dynamo fails."""
    with _quiet_exporter(), _traceable_batchnorm(net), torch.no_grad():
        try:
            return _export_dynamo(net, example, input_name, opset), "dynamo"
        except Exception as e:  # noqa: BLE001 - any network may trip the exporter: try the other one
            dynamo_error = e
        try:
            return _export_torchscript(net, example, input_name, opset), "torchscript"
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"torch.onnx cannot export {type(net).__name__}: dynamo exporter: "
                              f"{_first_line(dynamo_error)}; TorchScript exporter: {_first_line(e)}") from e


def _export_dynamo(net, example, input_name, opset):
    program = torch.onnx.export(net, (example,), dynamo=True, input_names=[input_name], output_names=[OUTPUT_NAME],
                                dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},), opset_version=opset,
                                verbose=False)
    return program.model_proto


def _export_torchscript(net, example, input_name, opset):
    import onnx

    buffer = io.BytesIO()
    torch.onnx.export(net, (example,), buffer, dynamo=False, input_names=[input_name], output_names=[OUTPUT_NAME],
                      dynamic_axes={input_name: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}}, opset_version=opset)
    return onnx.load_from_string(buffer.getvalue())


def _session_options(ort):
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return options


def _drop_stack_traces(proto) -> None:
    # the dynamo exporter notes the Python stack of every node: local paths, which a shipped file
    # should not carry (the module names in the other entries stay)
    for node in [*proto.graph.node, *(n for f in proto.functions for n in f.node)]:
        kept = [m for m in node.metadata_props if m.key != "pkg.torch.onnx.stack_trace"]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)


def _count_nodes(proto, op_type: str) -> int:
    return sum(n.op_type == op_type for n in proto.graph.node) + sum(
        n.op_type == op_type for f in proto.functions for n in f.node)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]
