"""Looking inside: activation statistics over training (internal covariate shift) and the BN doctor."""

from bnlab.inspect.activations import ActivationTracker, default_layers, shift_summary, snapshot
from bnlab.inspect.doctor import diagnose, fix


def tracker_for(settings, test=None, on_record=None) -> "ActivationTracker | None":
    """The tracker a run's settings ask for (``track_activations``), or None."""
    if not settings.track_activations:
        return None
    return ActivationTracker(every=settings.track_every, eval_data=test if settings.track_test_acc else None,
                             on_record=on_record)


__all__ = ["ActivationTracker", "default_layers", "shift_summary", "snapshot", "tracker_for", "diagnose", "fix"]
