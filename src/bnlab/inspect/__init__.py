"""Looking inside: the BN doctor, the loss landscape and gradient shift
(:mod:`bnlab.inspect.landscape`), and (re-exported from :mod:`bnlab.train.activations`, where the
training callback lives) activation statistics over training (internal covariate shift)."""

from bnlab.inspect.doctor import diagnose, fix, format_diagnosis
from bnlab.inspect.landscape import LandscapeProbe, format_landscape, gradient_shift, loss_landscape, summarize_probes
from bnlab.train.activations import ActivationTracker, default_layers, shift_summary, snapshot

__all__ = ["ActivationTracker", "default_layers", "shift_summary", "snapshot", "diagnose", "fix", "format_diagnosis",
           "LandscapeProbe", "format_landscape", "gradient_shift", "loss_landscape", "summarize_probes"]
