"""Watching internal covariate shift: the distribution of a layer's input over training.

The BN paper (Ioffe & Szegedy 2015, Fig. 1) tracks, for a sigmoid of the last hidden layer, the
{15, 50, 85}th percentiles of its input over training: without BN they wander, with BN they stay
put. :class:`ActivationTracker` records the same for any layers, every ``every`` steps, with
forward pre-hooks that only read (outputs and gradients are untouched). With tracking off no hook
exists, so it costs nothing.

Each snapshot keeps the chosen percentiles, mean, std and 99 quantiles (1..99%) of the layer's
input. The quantiles give the shift measure: the Wasserstein-1 distance between two snapshots of
a 1-D distribution is the mean absolute difference of their quantile functions,
``W1 ~= mean_p |Q_t(p) - Q_{t+1}(p)|``; a run's shift is that distance averaged over successive
snapshots and over the tracked layers (in the layer input's own units).
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

from bnlab.train.callbacks import Callback
from bnlab.train.loop import evaluate_loss_acc

NONLINEARITIES = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.GELU)
QUANTILES = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
MAX_EXACT = 1 << 24  # torch.quantile's input limit


def default_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose inputs activation tracking watches by default: the nonlinearities of a
    model (their inputs are what Fig. 1 tracks); for a network that applies its activations as
    functions (``torch.relu(x)``, no modules to hook), its normalization layers (the inputs BN
    normalizes); failing those, its Conv/Linear layers after the first.

    Args:
        model: any network; its ReLU, Sigmoid, Tanh, LeakyReLU, ELU and GELU modules are found
            first.

    Returns:
        ``{"<module name>:<class name>": module}`` in the order of ``model.named_modules()``.

    Example::

        list(default_layers(bnlab.models.build("keras-mlp", input_shape=(1, 8, 8), num_classes=10)))
        # ['2:ReLU', '4:ReLU']
    """
    from bnlab.nn import is_batchnorm, is_per_example_norm

    modules = list(model.named_modules())
    for wanted in (lambda m: isinstance(m, NONLINEARITIES), lambda m: is_batchnorm(m) or is_per_example_norm(m)):
        found = {f"{name}:{type(m).__name__}": m for name, m in modules if wanted(m)}
        if found:
            return found
    weights = [(name, m) for name, m in modules if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    return {f"{name}:{type(m).__name__}": m for name, m in weights[1:]}


def _quantiles(sorted_: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    # linear interpolation between order statistics, exactly as torch.quantile's default
    pos = qs * (sorted_.numel() - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    return sorted_[lo] + (sorted_[hi] - sorted_[lo]) * (pos - lo)


def snapshot(x: torch.Tensor, percentiles=(15, 50, 85)) -> dict:
    """Percentiles (linear interpolation, as ``torch.quantile``), mean, std and 99 quantiles of
    ``x``, all from one sort.

    Args:
        x: any tensor; all its values count as one distribution (in float64). Above 2**24
            values an evenly strided sample is used.
        percentiles: which percentiles to report, in 0..100.

    Returns:
        ``{"p15": ..., "p50": ..., "p85": ..., "mean", "std", "q"}`` (one ``p<n>`` key per
        percentile; ``std`` is the population std; ``q`` the 1%, 2%, ..., 99% quantiles), all floats.

    Example::

        snapshot(torch.randn(10_000))["p50"]   # about 0.0
    """
    flat = x.detach().reshape(-1).to("cpu", torch.float64)  # on any device (MPS has no float64)
    if flat.numel() > MAX_EXACT:  # very large inputs: an evenly strided sample
        flat = flat[:: -(-flat.numel() // MAX_EXACT)]
    s = flat.sort().values
    qs = torch.tensor([p / 100 for p in percentiles], dtype=torch.float64)
    return {**{f"p{p:g}": float(v) for p, v in zip(percentiles, _quantiles(s, qs))},
            "mean": float(flat.mean()), "std": float(flat.std(unbiased=False)),
            "q": [float(v) for v in _quantiles(s, QUANTILES)]}


class ActivationTracker(Callback):
    """Record the input distribution of ``layers`` every ``every`` training steps.

    ``layers``: names from :func:`default_layers` or ``model.named_modules()`` (default: every
    nonlinearity). Each snapshot uses the first ``max_examples`` examples of the batch (default
    64; ``None`` = all): a conv layer's input is millions of values, and sorting them all would
    cost more than the training step. ``records`` holds ``{"step", "layer", "p15", ..., "mean",
    "std", "q"}``;
    with ``eval_data`` also ``{"step", "layer": "test", "test_acc"}`` on up to ``eval_size``
    held-out examples at each snapshot. A :class:`bnlab.train.tensorboard.TensorBoardLogger`
    given this tracker draws each snapshot as a histogram.

    Snapshots are taken at step 1 and every ``every`` steps, in training mode only (evaluation
    passes are not recorded). The hooks are added when training begins and removed when it ends.

    Args:
        model: the network to watch; ``None``: the one :func:`~bnlab.train.fit` trains.
        layers: layer names to watch (see above); ``None``: every nonlinearity.
        every: steps between snapshots, at least 1.
        percentiles: the percentiles each snapshot reports (``p15``, ...).
        max_examples: examples of the batch each snapshot uses (``None``: all).
        eval_data: a :class:`bnlab.data.Dataset` to measure test accuracy on at each snapshot.
        eval_size: at most this many of ``eval_data``'s examples (the first ones).

    Raises:
        ValueError: ``every`` below 1.
        ConfigError: a name in ``layers`` that ``model`` does not have (when the model is known:
            at construction, or when training begins).

    Example::

        tracker = ActivationTracker(every=50)
        fit(net, train, test, epochs=2, callbacks=[tracker])
        tracker.summary()["ics_w1"]
    """

    def __init__(self, model: nn.Module | None = None, *, layers=None, every: int = 100, percentiles=(15, 50, 85),
                 max_examples: int | None = 64, eval_data=None, eval_size: int = 2000):
        if not isinstance(every, int) or every < 1:
            from bnlab.errors import ConfigError

            raise ConfigError(f"ActivationTracker(every={every!r}): a snapshot every K steps needs a whole K >= 1")
        self.every, self.percentiles, self.layer_names = every, tuple(percentiles), layers
        self.max_examples = max_examples
        self.eval_data, self.eval_size = eval_data, eval_size
        self.model, self.layers = None, {}
        self.records: list[dict] = []
        self._armed = False
        self._step = 0
        self._handles = []
        if model is not None:
            self.attach(model)

    def attach(self, model: nn.Module) -> None:
        """Choose the layers of ``model`` to watch (done by ``fit`` when no model was given)."""
        available = default_layers(model)
        named = dict(model.named_modules())
        if self.layer_names is None and not available:
            from bnlab.errors import ConfigError

            raise ConfigError(f"{type(model).__name__} has no nonlinearity, normalization, conv or linear layers to "
                              "track: name the modules to watch with layers=[...]")
        chosen = {}
        for name in self.layer_names if self.layer_names is not None else available:
            if name in available:
                chosen[name] = available[name]
            elif name in named:
                chosen[f"{name}:{type(named[name]).__name__}"] = named[name]
            else:
                from bnlab.errors import ConfigError

                raise ConfigError(f"no layer {name!r} to track; layers: {', '.join(available) or 'none'}")
        self.model, self.layers = model, chosen

    def _hook(self, name):
        def hook(module, args):
            if self._armed and module.training:
                x = args[0] if self.max_examples is None else args[0][: self.max_examples]
                self.records.append({"step": self._step, "layer": name, **snapshot(x, self.percentiles)})
        return hook

    def on_train_begin(self, state) -> None:
        if self.model is None:
            self.attach(state.model)
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]

    def on_batch_begin(self, state) -> None:
        step = state.step + 1
        self._armed = step == 1 or step % self.every == 0
        self._step = step

    def on_batch_end(self, state) -> None:
        if self._armed and self.eval_data is not None:
            self.records.append({"step": self._step, "layer": "test", "test_acc": self._test_acc()})
        self._armed = False

    def _test_acc(self) -> float:
        return evaluate_loss_acc(self.model, self.eval_data, limit=self.eval_size)[1]

    def on_train_end(self, state) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def summary(self) -> dict:
        """The run's internal covariate shift so far: :func:`shift_summary` of :attr:`records`."""
        return shift_summary(self.records)

    @classmethod
    def for_settings(cls, settings, test=None) -> "ActivationTracker | None":
        """The tracker a run's settings ask for (``track_activations``), or None."""
        if not settings.track_activations:
            return None
        return cls(every=settings.track_every, eval_data=test if settings.track_test_acc else None)


def shift_summary(records: list[dict]) -> dict:
    """Mean Wasserstein-1 shift between successive snapshots, per layer and overall.

    Args:
        records: snapshot records as :attr:`ActivationTracker.records` holds them (records
            without quantiles, such as test accuracy, are skipped; order does not matter).

    Returns:
        ``{"ics_w1": float or None, "ics_w1_per_layer": {layer: float}}``, in the units of each
        layer's input; a layer needs two snapshots to have a value, and ``ics_w1`` (the mean
        over layers) is None when none has.

    Example::

        shift_summary(tracker.records)["ics_w1_per_layer"]
    """
    by_layer: dict[str, list[dict]] = {}
    for r in records:
        if "q" in r:
            by_layer.setdefault(r["layer"], []).append(r)
    per_layer = {}
    for layer, snaps in by_layer.items():
        snaps.sort(key=lambda r: r["step"])
        dists = [statistics.fmean(abs(a - b) for a, b in zip(s0["q"], s1["q"])) for s0, s1 in zip(snaps, snaps[1:])]
        if dists:
            per_layer[layer] = statistics.fmean(dists)
    out = {"ics_w1": statistics.fmean(per_layer.values()) if per_layer else None, "ics_w1_per_layer": per_layer}
    return out
