"""A torch.compile'd model under the probe: its parameters are named through the
OptimizedModule (``_orig_mod.``), gradients come from the compiled backward.

The default backend is aot_eager (Dynamo and AOTAutograd, the layers that trace the
parameters and make the gradients; a few seconds). Inductor adds a C++ build of the kernels,
about 40 s cold on 2 CPU cores, so it runs only with OPTPROBE_COMPAT_INDUCTOR=1."""

import os
import shutil

import pytest
import torch

from tests.compat import harness as h


def _skip_reason(backend: str) -> str | None:
    try:
        import torch._dynamo as dynamo
    except ImportError as exc:  # pragma: no cover - torch builds without Dynamo
        return f"torch.compile unavailable: {exc}"
    if not dynamo.is_dynamo_supported():
        return "torch.compile (Dynamo) is not supported on this Python/platform"
    if backend == "inductor":
        if os.environ.get("OPTPROBE_COMPAT_INDUCTOR") != "1":
            return ("inductor builds C++ kernels, ~40 s cold on 2 CPU cores: set "
                    "OPTPROBE_COMPAT_INDUCTOR=1 to run it (aot_eager runs by default)")
        if shutil.which(os.environ.get("CXX", "g++")) is None:
            return "inductor on CPU needs a C++ compiler (g++ or $CXX)"
    return None


@pytest.fixture
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_model(fresh_dynamo, backend):
    reason = _skip_reason(backend)
    if reason:
        pytest.skip(reason)

    def make():
        return torch.compile(h.mlp(), backend=backend)

    plain, probed = h.both(make, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2))
    h.assert_same_params(plain.model, probed.model)
    h.check_stats(probed.recorder, probed.refs)
    assert {e.tags.get("param") for e in probed.recorder.events
            if e.topic == "grad/norm"} >= {"_orig_mod.0.weight", "_orig_mod.2.bias"}
