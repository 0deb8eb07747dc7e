"""The BN doctor: checks a trained network's batch-norm layers against the data.

For each BN layer it compares the running statistics with the population statistics recomputed
from training data (stale or corrupted running stats are the classic eval-mode failure), and for
the whole network the accuracy in eval mode (running stats) with the accuracy when every BN uses
the statistics of the batch at hand. It also flags odd momentum/eps values, layers that never
updated their statistics, and training batches too small for reliable statistics.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bnlab.devices import model_device
from bnlab.nn import is_batchnorm, is_per_example_norm, population_statistics, recalibrate_batchnorm
from bnlab.train import evaluate_loss_acc

# A channel whose running mean is off by more than this many population standard deviations, or
# whose running variance is off by more than this factor, is flagged.
MEAN_TOLERANCE = 0.25
VAR_RATIO_TOLERANCE = 2.0
DEAD_VARIANCE = 10.0  # channels with population variance below this many eps are constant (dead units)
MIN_VALUES_PER_CHANNEL = 32  # fewer values per channel per batch give noisy batch statistics
ACC_GAP = 0.02  # eval-mode accuracy this much below batch-statistics accuracy is flagged


# the advice to run --fix, kept in one place so a report of a fixed checkpoint can leave it out
FIX_ADVICE = "; recalibrate with `bnlab doctor CKPT --fix -o OUT`"
SMALL_BATCH_FIX = " or recalibrating (--fix)"

def accuracy(model: nn.Module, data, batch_size: int = 500, batch_stats: bool = False) -> float:
    """Accuracy with BN in eval mode, or with each BN using the current batch's statistics
    (other layers in eval mode; running statistics untouched)."""
    return evaluate_loss_acc(model, data, batch_size, bn_batch_stats=batch_stats)[1]


def _bn_shapes(model: nn.Module, bns, input_shape) -> dict:
    """The output shape (without the batch) of every BN layer in ``bns``, from one eval-mode
    forward pass of two zero examples; a layer the pass does not reach is left out."""
    shapes = {}

    def hook(mod, args, out):  # must return None: a forward hook's return value replaces the output
        shapes[mod] = tuple(out.shape[1:])

    handles = [bn.register_forward_hook(hook) for bn in bns]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((2, *input_shape), device=model_device(model)))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return shapes


def diagnose(model: nn.Module, train, test=None, *, batch_size: int | None = None, stats_limit: int = 10000) -> dict:
    """Check every BN layer of ``model`` (a trained network) on ``train`` (and ``test``) data.

    Per BN layer: running statistics against the population statistics of the first
    ``stats_limit`` training examples (mean off by more than 0.25 population std, variance off by
    more than 2x, over the channels whose input is not constant), statistics never updated,
    ``track_running_stats=False``, unusual momentum or eps, and (with ``batch_size``) too few
    values per channel in a training batch. With ``test``: eval-mode accuracy against the
    accuracy when BN uses each batch's statistics, flagged when more than 2 points lower.

    Args:
        model: the trained network; its weights and running statistics are not changed.
        train: the training :class:`bnlab.data.Dataset`, standardized as in training.
        test: held-out data for the accuracy comparison (``None``: skipped).
        batch_size: the training batch size, to check the values per channel (``None``: skipped).
        stats_limit: how many training examples the population statistics use.

    Returns:
        ``{"layers", "bn_layers", "problems"}`` and, with ``test``, ``"eval_acc"``,
        ``"batch_stats_acc"`` and ``"network_findings"``; ``other_norms`` lists the GroupNorm,
        LayerNorm and InstanceNorm layers (``layer``, ``type``, ``channels``), which have no
        running statistics to check; each of ``layers`` has ``layer``,
        ``type``, ``channels``, ``momentum``, ``eps``, ``findings`` (sentences), ``status``
        (``ok``/``warn``) and, where measured, ``mean_error_max``, ``mean_error_avg`` (in
        population std), ``var_ratio_worst``, ``dead_channels`` and ``values_per_channel``.
        ``problems`` counts the layers with a warning plus the network findings.
        :func:`format_diagnosis` prints it.

    Example::

        ck = bnlab.train.load_checkpoint("model.pt")
        train = bnlab.data.load(ck.settings["dataset"], "train", standardize=ck.standardizer)
        test = bnlab.data.load(ck.settings["dataset"], "test", standardize=ck.standardizer)
        rep = diagnose(ck.model, train, test, batch_size=ck.settings["batch_size"])
        rep["problems"]
    """
    names = {m: n for n, m in model.named_modules()}
    bns = [m for m in model.modules() if is_batchnorm(m)]
    data = train.subset(min(len(train), stats_limit))
    pop = population_statistics(model, data.batches(500)) if bns else {}
    shapes = _bn_shapes(model, bns, train.input_shape) if bns and batch_size is not None else {}
    layers = []
    for bn in bns:
        findings = []
        row = {"layer": names[bn], "type": type(bn).__name__, "channels": bn.num_features,
               "momentum": bn.momentum, "eps": bn.eps, "findings": findings}
        if bn.running_mean is None:
            findings.append("track_running_stats=False: uses batch statistics in eval mode too, so predictions "
                            "depend on the batch; fine for large batches, wrong for single examples")
        elif bn not in pop:
            findings.append("not reached by the forward pass: this layer is never used, so its statistics "
                            "cannot be checked (is it left over from an edit of the network?)")
        else:
            if int(bn.num_batches_tracked) == 0:
                findings.append("running statistics were never updated (num_batches_tracked = 0): was the "
                                "network only ever run in eval mode?")
            mean, var = pop[bn]
            # errors in the units BN divides by, over channels that vary at all: a dead unit's
            # statistics cannot matter, its output is a constant either way
            live = var > DEAD_VARIANCE * bn.eps
            row["dead_channels"] = int((~live).sum())
            if not live.any():
                live = torch.ones_like(live)
            running_mean, running_var = (t.to(mean.device, torch.float64) for t in (bn.running_mean, bn.running_var))
            mean_err = ((running_mean - mean).abs() / (var + bn.eps).sqrt())[live]
            ratio = ((running_var + bn.eps) / (var + bn.eps))[live]
            log_ratio = ratio.log().abs()
            row.update({"mean_error_max": float(mean_err.max()), "mean_error_avg": float(mean_err.mean()),
                        "var_ratio_worst": float(ratio[log_ratio.argmax()])})
            bad_mean = int((mean_err > MEAN_TOLERANCE).sum())
            bad_var = int((log_ratio > math.log(VAR_RATIO_TOLERANCE)).sum())
            if bad_mean or bad_var:
                findings.append(f"running statistics disagree with the data: {bad_mean} channel(s) with mean off by "
                                f"> {MEAN_TOLERANCE} std (worst {row['mean_error_max']:.2f}), {bad_var} with variance "
                                f"off by > {VAR_RATIO_TOLERANCE}x (worst {row['var_ratio_worst']:.2f}x)"
                                + FIX_ADVICE)
        if bn.momentum is not None and not (0.001 <= bn.momentum <= 0.5):
            findings.append(f"momentum {bn.momentum} is unusual (torch default 0.1): "
                            + ("running stats follow single batches" if bn.momentum > 0.5 else "running stats barely move"))
        if not (1e-8 <= bn.eps <= 1e-2):
            findings.append(f"eps {bn.eps} is unusual (default 1e-5)")
        if batch_size is not None and bn in shapes:
            shape = shapes[bn]
            per_channel = batch_size * (math.prod(shape[1:]) if len(shape) > 1 else 1)
            row["values_per_channel"] = per_channel
            if per_channel < MIN_VALUES_PER_CHANNEL:
                findings.append(f"training batches give only {per_channel} values per channel: batch statistics are "
                                "noisy; consider a larger batch, Ghost BN (--norm ghost), Batch Renorm (--norm renorm)"
                                + SMALL_BATCH_FIX)
        row["status"] = "warn" if findings else "ok"
        layers.append(row)
    others = [{"layer": names[m], "type": type(m).__name__, "channels": _channels(m)}
              for m in model.modules() if is_per_example_norm(m)]
    report = {"layers": layers, "bn_layers": len(bns), "other_norms": others}
    if test is not None and bns:
        report["eval_acc"] = accuracy(model, test)
        report["batch_stats_acc"] = accuracy(model, test, batch_stats=True)
        gap = report["batch_stats_acc"] - report["eval_acc"]
        report["network_findings"] = []
        if gap > ACC_GAP:
            report["network_findings"].append(
                f"eval-mode accuracy {report['eval_acc']:.4f} is {gap * 100:.1f} points below the accuracy with batch "
                f"statistics ({report['batch_stats_acc']:.4f}): the running statistics do not fit the data")
    report["problems"] = sum(r["status"] != "ok" for r in layers) + len(report.get("network_findings", []))
    return report


def fix(model: nn.Module, train, stats_limit: int | None = None) -> nn.Module:
    """Recalibrate every BN layer on training data (precise BN); returns the same model.

    Each BN layer's running mean and variance become the exact statistics of its input over
    the training examples (see :func:`bnlab.nn.recalibrate_batchnorm`); weights are unchanged.

    Args:
        model: the network, changed in place.
        train: the training :class:`bnlab.data.Dataset`, standardized as in training.
        stats_limit: use only the first this many examples (``None``: all).

    Returns:
        ``model``.

    Example::

        fix(net, train, stats_limit=10000)
        diagnose(net, train, test)["problems"]   # the running statistics now fit the data
    """
    data = train if stats_limit is None else train.subset(min(len(train), stats_limit))
    return recalibrate_batchnorm(model, data.batches(500))


def _channels(m: nn.Module) -> int | None:
    return getattr(m, "num_channels", None) or getattr(m, "num_features", None)


def format_diagnosis(rep: dict, fixed: bool = False) -> str:
    """A :func:`diagnose` report as text, as ``bnlab doctor`` prints it.

    One line per BN layer (``OK`` or ``WARN``, name, type, momentum, eps and how far its running
    statistics are from the data), its findings indented below, then the eval-mode vs
    batch-statistics test accuracy when the report has them, and a last line with the number of
    problems (or ``all BN layers look healthy``).

    Args:
        rep: the dict :func:`diagnose` returns.
        fixed: the checkpoint was just recalibrated (``--fix``): leave out the advice to do so.

    Returns:
        The lines as one string; ``"no batch-norm layers: nothing to check"`` for a network without BN.

    Example::

        print(format_diagnosis(diagnose(net, train, test, batch_size=64)))
    """
    others = rep.get("other_norms") or []
    other_line = (f"{len(others)} {'/'.join(sorted({r['type'] for r in others}))} layer(s): they normalize each "
                  "example by itself (no running statistics, the same in training and eval mode): nothing to check")
    if rep["bn_layers"] == 0:
        return other_line if others else "no batch-norm layers: nothing to check"
    lines = [other_line] if others else []
    for r in rep["layers"]:
        stats = ""
        if "mean_error_max" in r:
            stats = f"  running vs data: mean off by <= {r['mean_error_max']:.3f} std, variance x{r['var_ratio_worst']:.3f}"
        lines.append(f"{r['status'].upper():<4} {r['layer']} {r['type']}({r['channels']}) momentum={r['momentum']} "
                     f"eps={r['eps']}{stats}")
        for f in r["findings"]:
            if fixed:
                f = f.replace(FIX_ADVICE, " (recalibrated: see the last line)").replace(SMALL_BATCH_FIX, "")
            lines.append(f"       - {f}")
        if r.get("dead_channels"):
            lines.append(f"       (note: {r['dead_channels']} channel(s) are constant on this data, e.g. dead ReLUs)")
    if "eval_acc" in rep:
        lines.append(f"test accuracy: eval mode {rep['eval_acc']:.4f}, with batch statistics {rep['batch_stats_acc']:.4f}")
        lines += [f"  - {f}" for f in rep.get("network_findings", [])]
    lines.append(f"{rep['problems']} problem(s) found" if rep["problems"] else "all BN layers look healthy")
    return "\n".join(lines)
