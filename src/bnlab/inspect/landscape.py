"""How smooth is the loss along the gradient, and how much does a layer's gradient move when the
layers before it update? Santurkar et al. 2018 ("How does batch normalization help
optimization?"), Sec. 2.2 and 3.1, for any model.

Both measurements evaluate the network at other weights without touching it: the weights are
passed through ``torch.func.functional_call``, the buffers (BN's running statistics) are copied
for every evaluation, and every evaluation of one probe replays the same random draws (dropout
masks, noisy BN's noise), so the differences measured come from the weights alone. The model's
mode is kept: during training that is train mode, where BN normalizes with the batch's
statistics, as the training step sees it.

- :func:`loss_landscape`: from the weights ``w`` with gradient ``g`` on a batch, step to
  ``w - eta * g`` for several step sizes ``eta`` and record the loss there and how far the
  gradient moved, ``||grad L(w - eta g) - g||``. The spread of the losses is the paper's "loss
  landscape" (Fig. 4a), the gradient changes its "gradient predictiveness" (Fig. 4b), and the
  largest gradient change per distance moved, ``max_eta ||grad L(w - eta g) - g|| / ||eta g||``,
  its "effective beta-smoothness" (Fig. 4c).
- :func:`gradient_shift`: internal covariate shift measured the paper's way (Definition 2.1):
  for each layer i, its gradient ``G`` at the current weights against its gradient ``G'`` after
  the layers before it (in the order of the forward pass) took the plain gradient step
  ``w - lr * g``, the others kept. ``||G - G'||`` and ``cos(G, G')``; the paper's claim is that BN
  does not make this smaller.

:class:`LandscapeProbe` runs both every ``every`` training steps (``--track-landscape``).
"""

from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bnlab.errors import ConfigError
from bnlab.train.callbacks import Callback

WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
STEP_FACTORS = (0.5, 1.0, 2.0, 4.0)


def _rng_devices(x: torch.Tensor) -> list[int]:
    """The CUDA devices whose random state an evaluation on ``x``'s device must restore."""
    return [x.device.index if x.device.index is not None else torch.cuda.current_device()] if x.is_cuda else []


class _Evaluator:
    """The loss and gradient of ``model`` on one batch at any weights, with the same random
    draws and fresh copies of the buffers every time."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, seed: int):
        self.model, self.x, self.y, self.loss_fn, self.seed = model, x, y, loss_fn, seed
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        if not self.names:
            raise ConfigError(f"{type(model).__name__} has no trainable parameters to probe")
        self._base = None

    def base(self) -> tuple[float, dict[str, torch.Tensor]]:
        """The loss and gradient at the model's own weights (computed once)."""
        if self._base is None:
            self._base = self(self.weights)
        return self._base

    def __call__(self, weights: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        params = {n: w.detach().requires_grad_(True) for n, w in weights.items()}
        with torch.random.fork_rng(devices=_rng_devices(self.x)):
            torch.manual_seed(self.seed)
            out = functional_call(self.model, ({n: b.clone() for n, b in self.buffers.items()}, params), (self.x,),
                                  strict=False)
            loss = self.loss_fn(out, self.y)
        grads = torch.autograd.grad(loss, [params[n] for n in self.names], allow_unused=True)
        return float(loss.detach()), {n: (g if g is not None else torch.zeros_like(params[n])).detach()
                             for n, g in zip(self.names, grads)}


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def loss_landscape(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps, *, loss_fn=F.cross_entropy,
                   seed: int = 0) -> dict:
    """The loss and the gradient along the gradient direction from the model's current weights.

    Args:
        model: any ``nn.Module``; its weights, buffers and mode are left as they are.
        x, y: one batch (inputs and targets) on the model's device.
        steps: the step sizes ``eta`` (positive numbers), e.g. multiples of the learning rate.
        loss_fn: ``loss_fn(model(x), y)``, a scalar (default cross-entropy).
        seed: the random draws every evaluation replays (dropout, noisy BN).

    Returns:
        ``{"loss", "grad_norm", "steps", "losses", "grad_changes", "loss_min", "loss_max",
        "loss_range", "grad_change_min", "grad_change_max", "beta"}``: the loss and gradient
        norm at the current weights; the loss and ``||grad L(w - eta g) - g||`` at each step size;
        the spread of the losses (the current one included); and the effective beta-smoothness,
        ``max ||grad L(w - eta g) - g|| / (eta ||g||)`` (NaN when the gradient is zero).
        A non-finite loss along the way is recorded as it is.

    Raises:
        ConfigError: no step sizes, or one that is not positive; a model without trainable
            parameters.

    Example::

        out = loss_landscape(net.train(), x, y, steps=[0.05, 0.1, 0.2, 0.4])
        out["loss_range"], out["beta"]
    """
    return _landscape(_Evaluator(model, x, y, loss_fn, seed), steps)


def _landscape(ev: _Evaluator, steps) -> dict:
    steps = [float(s) for s in steps]
    if not steps or any(not s > 0 for s in steps):
        raise ConfigError(f"loss_landscape needs positive step sizes, got {steps}")
    loss0, g = ev.base()
    gnorm = _norm(g.values())
    losses, changes = [], []
    for eta in steps:
        loss, g2 = ev({n: w - eta * g[n] for n, w in ev.weights.items()})
        losses.append(loss)
        changes.append(_norm(g2[n] - g[n] for n in ev.names))
    betas = [c / (eta * gnorm) for c, eta in zip(changes, steps)] if gnorm > 0 else [math.nan]
    every = [loss0, *losses]
    return {"loss": loss0, "grad_norm": gnorm, "steps": steps, "losses": losses, "grad_changes": changes,
            "loss_min": min(every), "loss_max": max(every), "loss_range": max(every) - min(every),
            "grad_change_min": min(changes), "grad_change_max": max(changes), "beta": max(betas)}


def _forward_order(model: nn.Module, ev: _Evaluator) -> list[str]:
    """Names of the modules that own parameters, in the order the forward pass first calls them."""
    owners = {name: m for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    order: list[str] = []

    def hook(name):
        def record(module, args):
            if name not in order:
                order.append(name)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in owners.items()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=_rng_devices(ev.x)):
            functional_call(model, ({n: b.clone() for n, b in ev.buffers.items()}, ev.weights), (ev.x,), strict=False)
    finally:
        for h in handles:
            h.remove()
    return order


def gradient_shift(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, *, layers=None,
                   loss_fn=F.cross_entropy, seed: int = 0) -> list[dict]:
    """Internal covariate shift as Santurkar et al. define it: how much each layer's gradient
    changes when the layers before it take their gradient step.

    For layer i with gradient ``G`` at the current weights ``w``: the layers called before it in
    the forward pass move to ``w - lr * g`` (the step plain SGD takes), layer i and those after it
    keep ``w``, and ``G'`` is layer i's gradient there.

    Args:
        model: any ``nn.Module``; its weights, buffers and mode are left as they are.
        x, y: one batch on the model's device.
        lr: the step size of the earlier layers' update.
        layers: module names to measure (any that own parameters); ``None``: every Conv/Linear
            layer but the first in forward order (the first has no layers before it).
        loss_fn, seed: as for :func:`loss_landscape`.

    Returns:
        One ``{"layer": "<name>:<class>", "l2": ||G - G'||, "rel": ||G - G'|| / ||G||,
        "cos": cos(G, G'), "grad_norm": ||G||}`` per layer, in forward order (``rel`` and
        ``cos`` are NaN when a gradient is zero).

    Raises:
        ConfigError: ``lr`` not positive; a name in ``layers`` that the model does not have or
            that owns no parameters, or was not reached by the forward pass.

    Example::

        for r in gradient_shift(net.train(), x, y, lr=0.1):
            print(r["layer"], r["l2"], r["cos"])
    """
    if not lr > 0:
        raise ConfigError(f"gradient_shift needs a positive lr, got {lr}")
    ev = _Evaluator(model, x, y, loss_fn, seed)
    return _shift(ev, lr, layers, _forward_order(model, ev))


def _shift(ev: _Evaluator, lr: float, layers, order: list[str]) -> list[dict]:
    model = ev.model
    modules = dict(model.named_modules())
    if layers is None:
        chosen = [n for n in order if isinstance(modules[n], WEIGHT_LAYERS)][1:]
    else:
        chosen = list(layers)
        for n in chosen:
            if n not in order:
                why = "has no such module" if n not in modules else "does not call it with parameters of its own"
                raise ConfigError(f"gradient_shift: {type(model).__name__} {why}: {n!r}; "
                                  f"layers with parameters: {', '.join(order)}")
    _, g = ev.base()

    def own(name):
        prefix = f"{name}." if name else ""
        return [p for p in ev.names if p.startswith(prefix) and "." not in p[len(prefix):]]

    out = []
    for name in chosen:
        earlier = {p for n in order[: order.index(name)] for p in own(n)}
        _, g2 = ev({n: (w - lr * g[n] if n in earlier else w) for n, w in ev.weights.items()})
        mine = own(name)
        a = torch.cat([g[p].double().flatten() for p in mine])
        b = torch.cat([g2[p].double().flatten() for p in mine])
        l2, na, nb = float((a - b).norm()), float(a.norm()), float(b.norm())
        out.append({"layer": f"{name}:{type(modules[name]).__name__}", "l2": l2,
                    "rel": l2 / na if na > 0 else math.nan,
                    "cos": float(a @ b) / (na * nb) if na > 0 and nb > 0 else math.nan, "grad_norm": na})
    return out


class LandscapeProbe(Callback):
    """Every ``every`` training steps (and at step 1), before the step: :func:`loss_landscape`
    at ``factors`` times the optimizer's current learning rate, and :func:`gradient_shift` of
    ``layers`` with that learning rate, on the step's own batch.

    ``records`` holds ``{"step", "layer": "landscape", "loss", "grad_norm", "loss_min",
    "loss_max", "loss_range", "grad_change_min", "grad_change_max", "beta"}`` and, per layer,
    ``{"step", "layer": "ics:<name>", "l2", "rel", "cos", "grad_norm"}``. Training itself is
    unchanged: the probe restores the random state it uses and writes nothing into the model.

    Args:
        every: steps between probes, at least 1.
        factors: the landscape's step sizes as multiples of the learning rate.
        layers: the layers :func:`gradient_shift` measures (``None``: its default).
        ics: also measure the gradient shift (one more forward and backward pass per layer).

    Example::

        probe = LandscapeProbe(every=50)
        fit(net, train, test, optimizer="sgd", lr=0.1, callbacks=[probe])
        probe.summary()["beta"]
    """

    def __init__(self, every: int = 100, *, factors=STEP_FACTORS, layers=None, ics: bool = True):
        if not isinstance(every, int) or every < 1:
            raise ConfigError(f"LandscapeProbe(every={every!r}): a probe every K steps needs a whole K >= 1")
        if not factors or any(not f > 0 for f in factors):
            raise ConfigError(f"LandscapeProbe(factors={factors!r}): step factors must be positive numbers")
        self.every, self.factors, self.layers, self.ics = every, tuple(float(f) for f in factors), layers, ics
        self.records: list[dict] = []
        self._order = None  # the forward order of the layers, found at the first probe

    def on_batch_begin(self, state) -> None:
        step = state.step + 1
        if not (step == 1 or step % self.every == 0) or state.batch is None:
            return
        x, y = state.batch
        lr = float(state.optimizer.param_groups[0]["lr"])
        ev = _Evaluator(state.model, x, y, F.cross_entropy, step)  # one base gradient for both measures
        land = _landscape(ev, [f * lr for f in self.factors])
        keep = ("loss", "grad_norm", "loss_min", "loss_max", "loss_range", "grad_change_min", "grad_change_max", "beta")
        self.records.append({"step": step, "layer": "landscape", **{k: land[k] for k in keep}})
        if self.ics:
            if self._order is None:
                self._order = _forward_order(state.model, ev)
            for r in _shift(ev, lr, self.layers, self._order):
                self.records.append({"step": step, "layer": f"ics:{r.pop('layer')}", **r})

    def summary(self) -> dict:
        """Means over the probes so far: ``loss_range``, ``grad_change`` (the largest change of
        each probe), ``beta``, and over layers too ``ics_l2``, ``ics_rel``, ``ics_cos`` (finite
        values only; a key is missing when nothing was measured)."""
        return summarize_probes(self.records)

    @classmethod
    def for_settings(cls, settings) -> "LandscapeProbe | None":
        """The probe a run's settings ask for (``track_landscape``, every ``track_every`` steps), or None."""
        return cls(every=settings.track_every) if settings.track_landscape else None


def summarize_probes(records: list[dict]) -> dict:
    """The means :meth:`LandscapeProbe.summary` reports, from probe records (other records are skipped)."""
    cols = {"loss_range": ("landscape", "loss_range"), "grad_change": ("landscape", "grad_change_max"),
            "beta": ("landscape", "beta"), "ics_l2": ("ics:", "l2"), "ics_rel": ("ics:", "rel"),
            "ics_cos": ("ics:", "cos")}
    out = {}
    for key, (kind, field) in cols.items():
        vals = [r[field] for r in records if str(r.get("layer", "")).startswith(kind) and field in r
                and r[field] is not None and math.isfinite(r[field])]
        if vals:
            out[key] = statistics.fmean(vals)
    return out


def format_landscape(summary: dict, every: int | None = None) -> str:
    """One line of :meth:`LandscapeProbe.summary` for people (what ``bnlab train --track-landscape`` prints)."""
    if not summary:
        return "landscape: nothing measured (no probe ran)"
    parts = [f"{label} {summary[k]:.4g}" for k, label in (("loss_range", "loss range"), ("grad_change", "gradient change"),
                                                           ("beta", "effective beta"), ("ics_l2", "gradient shift l2"),
                                                           ("ics_cos", "cos")) if k in summary]
    when = f" (mean over probes every {every} steps)" if every else ""
    return f"landscape along the gradient{when}: " + ", ".join(parts)
