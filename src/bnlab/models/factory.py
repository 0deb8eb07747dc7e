"""Networks from Python code: ``path/to/file.py:factory`` or ``package.module:factory``.

A factory is a callable returning an ``nn.Module``. bnlab's own protocol is
``factory(input_shape, num_classes, **options)``; a factory written for another library (one
without an ``input_shape`` parameter, e.g. ``torchvision.models:resnet18``) gets only what its
signature accepts: ``num_classes``, and ``in_channels``/``in_chans`` where it has them.

**The factory is your own code and bnlab runs it**, as ``python file.py`` would: use only files
you trust. A checkpoint records the reference (for a file: its absolute path and SHA-256) and
rebuilds the network by calling the factory again; a file that has changed or gone since is an
error, never silently different weights. Checkpoints still hold only tensors and plain values
(``torch.load(weights_only=True)``).

BN placement for such models (``bn``):

- the factory takes a ``bn`` argument: ``none``/``before``/``after`` are passed to it and
  ``tutorial`` calls it without one (its own default);
- otherwise ``tutorial`` means *as written*, ``none`` replaces every BN layer by an identity (a
  Conv/Linear that had ``bias=False`` because BN followed gets a zero bias), and
  ``before``/``after`` are refused.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import torch
from torch import nn

from bnlab.errors import ConfigError

# "file.py:factory" or "pkg.module:factory" (a zoo name never has a colon)
_MODULE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_IDENT = re.compile(r"^[A-Za-z_][\w]*$")


def is_reference(text) -> bool:
    """True for ``file.py:factory`` and ``package.module:factory``.

    Only the form is checked (one colon, a Python identifier after it): nothing is imported and
    the file need not exist.

    Args:
        text: a ``--model`` value; anything but a string gives False.

    Example::

        is_reference("nets/small.py:make"), is_reference("torchvision.models:resnet18")   # True, True
        is_reference("deeplizard-cnn"), is_reference("spec.toml")                         # False, False
    """
    if not isinstance(text, str) or text.count(":") != 1:
        return False
    where, name = text.split(":")
    return bool(_IDENT.match(name)) and (where.endswith(".py") or bool(_MODULE.match(where)))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reference_spec(text: str) -> dict:
    """The spec of a Python model reference: what a checkpoint records to rebuild it."""
    if not is_reference(text):
        raise ConfigError(f"model {text!r}: write path/to/file.py:factory or package.module:factory")
    where, name = text.split(":")
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"model {text!r}: {path} does not exist")
        return {"name": text, "python": {"file": str(path), "sha256": _sha256(path), "factory": name}}
    return {"name": text, "python": {"module": where, "factory": name}}


def is_python_spec(spec) -> bool:
    return isinstance(spec, dict) and isinstance(spec.get("python"), (dict, str))


def load_factory(spec: dict):
    """The factory a Python spec names (a zoo entry's ``python`` is ``"module:factory"``)."""
    ref = spec["python"]
    if isinstance(ref, str):
        module, name = ref.split(":")
        ref = {"module": module, "factory": name}
    label = spec.get("name", "model")
    if "file" in ref:
        path = Path(ref["file"])
        if not path.is_file():
            raise ConfigError(f"model {label!r}: its file {path} is gone: put it back, or train again")
        if ref.get("sha256") and _sha256(path) != ref["sha256"]:
            raise ConfigError(f"model {label!r}: {path} has changed since this network was made (SHA-256 differs): "
                              "restore that version of the file, or train again")
        mod_name = f"bnlab_user_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
        module = sys.modules.get(mod_name)
        if module is None or getattr(module, "__bnlab_sha256__", None) != ref.get("sha256"):
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            try:
                loader_spec.loader.exec_module(module)
            except Exception as e:  # noqa: BLE001 - the user's code: say where it failed, in one line
                raise ConfigError(f"model {label!r}: importing {path} raised {type(e).__name__}: {e}") from None
            module.__bnlab_sha256__ = ref.get("sha256")
            sys.modules[mod_name] = module
    else:
        try:
            module = importlib.import_module(ref["module"])
        except ImportError as e:
            raise ConfigError(f"model {label!r}: cannot import {ref['module']} ({e})") from None
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"model {label!r}: importing {ref['module']} raised {type(e).__name__}: {e}") from None
    fn = getattr(module, ref["factory"], None)
    if not callable(fn):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")][:8]
        raise ConfigError(f"model {label!r}: {module.__name__ if 'file' not in ref else ref['file']} has no callable "
                          f"{ref['factory']!r} (it has: {', '.join(names) or 'nothing callable'})")
    return fn


def _parameters(fn) -> tuple[set[str], bool]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set(), True
    params = sig.parameters.values()
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def takes(fn, option: str) -> bool:
    """Whether ``fn`` accepts keyword ``option`` by name."""
    return option in _parameters(fn)[0]


def call_factory(spec: dict, *, input_shape, num_classes: int, bn: str = "none", **options) -> nn.Module:
    """Build the network of a Python spec: call its factory with what its signature accepts,
    apply ``bn`` as the module docstring says, and check the result (an ``nn.Module`` whose
    output for a batch of ``input_shape`` has ``num_classes`` columns)."""
    fn = load_factory(spec)
    label = spec.get("name", "model")
    named, var_kw = _parameters(fn)
    if "input_shape" in named:  # bnlab's protocol: the options it names (all of them with **kwargs)
        kwargs = {"input_shape": tuple(input_shape), "num_classes": num_classes}
        kwargs.update({k: v for k, v in options.items() if v is not None and (var_kw or k in named)})
    else:  # written for another library: only what it names
        kwargs = {"num_classes": num_classes} if ("num_classes" in named or var_kw) else {}
        for key in ("in_channels", "in_chans"):
            if key in named and len(input_shape) > 1:
                kwargs[key] = input_shape[0]
    takes_bn = "bn" in named
    if takes_bn and bn != "tutorial":
        kwargs["bn"] = bn
    elif bn in ("before", "after"):
        raise ConfigError(f"model {label!r}: bn={bn} needs a factory that takes a 'bn' argument; this one does not: "
                          "use bn=tutorial (the model as written) or bn=none (its BN layers removed)")
    try:
        model = fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's code: one line naming it
        raise ConfigError(f"model factory {label!r} raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {label!r} returned {type(model).__name__}, not a torch.nn.Module")
    if bn == "none" and not takes_bn:
        from bnlab.nn.norms import strip_batchnorm

        strip_batchnorm(model)
    _check_output(model, label, input_shape, num_classes)
    return model


def _check_output(model: nn.Module, label: str, input_shape, num_classes: int) -> None:
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *input_shape), device=device))
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"model {label!r} fails on inputs of shape {tuple(input_shape)}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model {label!r} outputs {shape} per example, but the data has {num_classes} classes: "
                          "its factory should take num_classes (or return num_classes logits)")
