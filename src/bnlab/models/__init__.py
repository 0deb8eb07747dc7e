"""Networks: specs (data), the builder, and the zoo of reference networks.

>>> from bnlab import models
>>> net = models.build("deeplizard-cnn", bn="tutorial", input_shape=(1, 28, 28), num_classes=10)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bnlab.models.spec import (ACTIVATIONS, BN_IMPLS, BN_PLACEMENTS, NORMS, build_from_spec, check_build_options,
                               format_summary, load_spec, output_shapes, summary, validate_spec)
from bnlab.errors import ConfigError
from bnlab.models.factory import call_factory, is_python_spec, is_reference, load_factory, reference_spec, takes
from bnlab.models.zoo import ZOO, get_spec
from bnlab.nn.norms import standardize_weights, warn_group_counts

__all__ = ["build", "build_python", "resolve_spec", "is_reference", "ZOO", "get_spec", "load_spec", "validate_spec", "summary", "format_summary",
           "output_shapes", "ACTIVATIONS", "BN_PLACEMENTS", "NORMS", "BN_IMPLS"]


def resolve_spec(name_or_spec) -> dict:
    """A validated spec from a zoo name, a ``.toml`` path, a Python reference
    (``file.py:factory``, ``package.module:factory``: see :mod:`bnlab.models.factory`) or a spec dict.

    Args:
        name_or_spec: a zoo name, a spec ``.toml`` path (or any existing file), a Python
            reference, or a spec dict (validated; a dict with a ``python`` key is copied as it is).

    Returns:
        A new spec dict: a layer spec with its defaults filled in (:func:`validate_spec`), or a
        Python spec (``{"name", "python", ...}``; for a file, its absolute path and SHA-256).

    Raises:
        ConfigError: an unknown zoo name, a missing or invalid spec file, an invalid spec dict,
            or a reference to a ``.py`` file that does not exist.

    Example::

        resolve_spec("deeplizard-cnn")["layers"][0]   # {'type': 'conv', 'out': 6, 'kernel': 5}
        resolve_spec("my_nets.py:small_cnn")          # {'name': ..., 'python': {'file': ..., 'sha256': ...}}
    """
    if isinstance(name_or_spec, dict):
        return dict(name_or_spec) if is_python_spec(name_or_spec) else validate_spec(name_or_spec)
    text = str(name_or_spec)
    if is_reference(text):
        return reference_spec(text)
    if text.endswith(".toml") or Path(text).is_file():
        return load_spec(text)
    spec = get_spec(text)
    return dict(spec) if is_python_spec(spec) else validate_spec(spec)


def build(name_or_spec, *, input_shape, num_classes: int, bn: str = "none", norm: str = "batch",
          bn_impl: str = "bnlab", activation: str | None = None, dropout: float | None = None,
          virtual_batch_size: int = 32, norm_groups: int = 32, weight_std: bool = False,
          bn_momentum: float | None = None, seed: int | None = None) -> nn.Module:
    """Build a network by zoo name, spec file, Python factory or spec dict, with BN placed as asked.

    Args:
        name_or_spec: a zoo name (``bnlab models list``), a spec ``.toml`` path, your own network
            as ``path/to/file.py:factory`` or ``package.module:factory`` (see
            :mod:`bnlab.models.factory`: ``bn=tutorial`` builds it as written), or a spec dict.
        input_shape: one example's shape without the batch, e.g. ``(1, 28, 28)``.
        num_classes: the number of logits.
        bn: ``none``, ``before``/``after`` (the activation of every conv/dense layer but the
            last), or ``tutorial`` (the zoo entry's own placement).
        norm: the normalizer at each BN place: ``batch``, ``renorm``, ``ghost`` (virtual batches
            of ``virtual_batch_size``), ``ghost-renorm`` (batch renorm over virtual batches),
            ``noisy`` (BN plus per-step noise), ``group`` (``norm_groups`` groups), ``layer``,
            ``instance`` or ``none`` (see :mod:`bnlab.nn.norms`). A Python model's BN layers are
            swapped for it (:func:`bnlab.nn.swap_norm`) unless its factory takes ``norm``.
        bn_impl: ``bnlab`` or ``torch`` layers.
        activation: replaces the spec's activation everywhere (a name in :data:`ACTIVATIONS`);
            ``None`` keeps it. Passed on to a Python factory that takes it.
        dropout: replaces the probability of every dropout layer; ``None`` keeps the spec's.
        virtual_batch_size: examples per virtual batch of ``norm="ghost"`` and ``"ghost-renorm"``.
        bn_momentum: the weight of each batch in every BN layer's running averages (torch's
            ``momentum``; Keras' ``1 - momentum``); ``None`` keeps the layers' own (0.1).
        norm_groups: GroupNorm's groups (capped at a divisor of the channels, with a warning).
        weight_std: make every ``Conv2d`` weight-standardized (:class:`bnlab.nn.WSConv2d`).
        seed: initialize the weights from ``torch.manual_seed(seed)``, exactly as ``bnlab train
            --seed`` does (``None``: from torch's current random state).

    Returns:
        The network: an ``nn.Sequential`` (training mode) for a layer spec, the factory's module
        for a Python one.

    Raises:
        ConfigError: an unknown name, placement, norm, implementation or activation; a spec
            without a tutorial placement asked for ``bn="tutorial"``; a network that does not fit
            ``input_shape`` or does not end in ``num_classes`` logits; a Python factory that fails.

    Example::

        net = build("deeplizard-cnn", bn="tutorial", input_shape=(1, 28, 28), num_classes=10, seed=50)
    """
    if seed is not None:
        torch.manual_seed(seed)
    spec = resolve_spec(name_or_spec)
    if not isinstance(weight_std, bool):
        raise ConfigError(f"weight_std must be true or false, got {weight_std!r}")
    if not is_python_spec(spec):
        model = build_from_spec(spec, input_shape=input_shape, num_classes=num_classes, bn=bn, norm=norm,
                                bn_impl=bn_impl, activation=activation, dropout=dropout,
                                virtual_batch_size=virtual_batch_size, norm_groups=norm_groups)
    else:
        model = build_python(spec, input_shape=input_shape, num_classes=num_classes, bn=bn, norm=norm,
                             bn_impl=bn_impl, activation=activation, dropout=dropout,
                             virtual_batch_size=virtual_batch_size, norm_groups=norm_groups)
    if norm == "group" and torch.get_default_device().type != "meta":
        warn_group_counts(model, norm_groups)
    if bn_momentum is not None:
        from bnlab.nn import is_batchnorm

        if not 0 < bn_momentum <= 1:
            raise ConfigError(f"bn_momentum must be in (0, 1] (the weight of each batch in the running averages), "
                              f"got {bn_momentum!r}")
        for m in model.modules():
            if is_batchnorm(m):
                m.momentum = float(bn_momentum)
    return standardize_weights(model) if weight_std else model


def build_python(spec: dict, *, input_shape, num_classes: int, bn: str, norm: str, bn_impl: str,
                 norm_groups: int = 32, **options) -> nn.Module:
    """A Python spec's network (:func:`bnlab.models.factory.call_factory`), with its BN layers
    made ``bn_impl``'s, or swapped for ``norm`` (:func:`bnlab.nn.swap_norm`) when that is not
    ``batch`` and the factory takes no ``norm`` argument.

    :func:`build` calls this for Python specs; call it yourself only with a spec from
    :func:`resolve_spec`. With ``bn="none"`` and a factory that takes no ``bn`` argument, the
    network's BN layers are replaced by identities and a ``UserWarning`` says how many.

    Args:
        spec: a Python spec (``{"name", "python": ...}``), e.g. from :func:`resolve_spec`.
        input_shape, num_classes, bn, norm, bn_impl, norm_groups: as for :func:`build`.
        **options: ``activation``, ``dropout``, ``virtual_batch_size``: passed to a factory
            that names them (or takes ``**kwargs``); ``None`` values are left out.

    Returns:
        The factory's network, checked to give ``num_classes`` logits for ``input_shape``.

    Raises:
        ConfigError: an unknown ``bn`` or ``norm``; ``bn`` ``before``/``after`` for a factory
            without that argument; a factory that is missing, changed, fails or returns the wrong
            thing; a normalizer that does not fit one of its BN layers.

    Example::

        spec = resolve_spec("resnet20")
        net = build_python(spec, input_shape=(3, 32, 32), num_classes=10, bn="tutorial", norm="batch",
                           bn_impl="torch")
    """
    import warnings

    from bnlab.nn import convert, is_batchnorm, swap_norm

    fn = load_factory(spec)
    check_build_options(bn=bn, norm=norm, bn_impl=bn_impl)
    as_written = None
    if bn == "none" and not takes(fn, "bn") and torch.get_default_device().type != "meta":
        with torch.random.fork_rng(devices=[]):  # counting must not use up the seeded random draws
            as_written = sum(map(is_batchnorm, call_factory(spec, input_shape=input_shape, num_classes=num_classes,
                                                            bn="tutorial", **options).modules()))
    model = call_factory(spec, input_shape=input_shape, num_classes=num_classes, bn=bn, norm=norm, bn_impl=bn_impl,
                         norm_groups=norm_groups,
                         **options)
    if as_written:
        warnings.warn(f"bn=none removed the {as_written} BN layer(s) of {spec['name']} (bn=tutorial keeps the model "
                      "as written)", stacklevel=2)
    if takes(fn, "norm") and norm != "batch":
        return model  # the factory placed the normalizer itself
    if norm != "batch" and bn != "none":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # build() says once which layers have fewer groups
                return swap_norm(model, norm, impl=bn_impl, groups=norm_groups,
                                 virtual_batch_size=options.get("virtual_batch_size") or 32)
        except ConfigError as e:
            raise ConfigError(f"model {spec['name']!r}: norm={norm}: {e}") from None
    return convert(model, to=bn_impl) if not takes(fn, "bn_impl") else model
