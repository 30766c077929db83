"""optprobe's face: ``probe.attach`` wraps any optimizer; CLI ``probe``; pytest gates."""

from probe.attach import Probe, attach

__all__ = ["Probe", "attach"]
