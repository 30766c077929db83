"""Test settings: undeclared topics are errors, seeds are fixed."""

import os

os.environ.setdefault("OPTPROBE_STRICT_TOPICS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests' models are tiny: intra-op threads only add barrier waits (tens of ms per op on a
# loaded 2-core box), and one thread keeps the numbers reproducible.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_addoption(parser, pluginmanager):
    # The plugin comes through the pytest11 entry point once optprobe is installed; from a bare
    # checkout (PYTHONPATH=.) register it here so the gates and their options still exist.
    if not pluginmanager.has_plugin("optprobe"):
        import probe.pytest_plugin

        if not pluginmanager.is_registered(probe.pytest_plugin):
            pluginmanager.register(probe.pytest_plugin, "optprobe")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
