"""What a person sees through a real TensorBoard server (its HTTP data API on 127.0.0.1):
text shown as written, under the topic's own tag, and a custom-scalar layout whose charts
are each optimizer's first, totals before per-tensor lines, hparams shown as given; and, where
chromium is installed, the pages as a browser draws them."""

import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest
import torch

import hooks
from dashboards import TensorBoard
from probe.tensorboard_cmd import start, stop

ROUTING = ("param          route   shape  in*kh*kw\n"
           "| fc.weight | muon | 64x32 | 32 |\n"
           "policy auto_rho*out=1*32")
NAN = float("nan")
HPARAMS = {"optimizer": "muon", "lr": 0.01, "steps": 100000, "nesterov": True}


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={
        "Content-Type": "application/json", "X-XSRF-Protected": "1"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run = tmp_path_factory.mktemp("tb") / "r0-muon"
    bus = hooks.Bus()
    bus.subscribe(TensorBoard(run, hparams=HPARAMS), "*")
    tags = [{"param": f"l{i}"} for i in range(3)]
    for s in range(3):
        bus.begin_step(s)
        if s == 0:
            bus.emit("muon/routing", ROUTING)
            bus.emit_samples("grad/hist", [torch.arange(100.0), torch.tensor([2.0, NAN])], tags[:2])
        bus.emit_each("grad/norm", [1.0 + s, 2.0, 3.0], tags)
        bus.emit("grad/norm", 4.0)
        bus.emit_each("kfac/cond_A", [10.0, 1e4, 1e8], tags)
        bus.emit("muon/ns_residual", 0.1, param="l0")
        bus.emit("time/muon/newton_schulz", 2.0)
        bus.emit("step/time_ms", 5.0)
        bus.emit("train/loss", 1.0 / (s + 1))
        bus.end_step()
    bus.close()
    proc, url = start(run, host="127.0.0.1", port=0, timeout=90)
    yield url, run.name
    stop(proc)


def test_histograms_from_samples_are_served_with_every_value(server):
    """A step's histogram samples (one Vector, bucketed in numpy) as the histograms plugin
    serves them: every finite value counted, the buckets spanning min to max."""
    url, run = server
    q = urllib.parse.urlencode({"run": run, "tag": "grad/hist/l0"})
    ((_, step, buckets),) = _get(f"{url}/data/plugin/histograms/histograms?{q}")
    assert step == 0 and len(buckets) == 30
    assert sum(c for _, _, c in buckets) == pytest.approx(100)
    assert buckets[0][0] == pytest.approx(0.0) and buckets[-1][1] == pytest.approx(99.0)
    q = urllib.parse.urlencode({"run": run, "tag": "grad/hist/l1"})
    ((_, _, buckets),) = _get(f"{url}/data/plugin/histograms/histograms?{q}")
    assert sum(c for _, _, c in buckets) == pytest.approx(1)  # the NaN is left out


def test_text_is_under_the_topic_tag_and_renders_as_written(server):
    url, run = server
    tags = _get(url + "data/plugin/text/tags")
    assert tags[run] == ["muon/routing"]  # not muon/routing/text_summary
    q = urllib.parse.urlencode({"run": run, "tag": "muon/routing"})
    (item,) = _get(url + "data/plugin/text/text?" + q)
    html = item["text"]
    assert "<pre><code>" in html and "<em>" not in html  # a code block, no italics
    for piece in ("in*kh*kw", "| fc.weight | muon | 64x32 | 32 |", "auto_rho*out=1*32"):
        assert piece in html, piece


def test_layout_puts_the_optimizer_first_and_totals_before_tensors(server):
    url, run = server
    layout = _get(url + "data/plugin/custom_scalars/layout")
    titles = [c["title"] for c in layout["category"]]
    assert titles.index("Muon") < titles.index("Step") and titles.index("K-FAC") < \
        titles.index("Updates")
    charts = {c["title"]: [ch["title"] for ch in c["chart"]] for c in layout["category"]}
    assert charts["Muon"][0] == "Muon stage times (ms)"
    ups = charts["Updates"]
    assert ups.index("gradient norm (total)") < ups.index("gradient norm per tensor")
    assert "condition numbers, log10" in charts["K-FAC"]
    # the log10 series TensorBoard serves are the log10 of the written values
    q = urllib.parse.urlencode({"run": run, "tag": "kfac/cond_A_log10/l2"})
    assert [round(v, 6) for _, _, v in _get(url + "data/plugin/scalars/scalars?" + q)] == \
        [8.0, 8.0, 8.0]


def test_hparams_keep_their_types(server):
    url, run = server
    exp = _post(url + "data/plugin/hparams/experiment", {"experimentName": ""})
    types = {h["name"]: h["type"] for h in exp["hparamInfos"]}
    assert types == {"optimizer": "DATA_TYPE_STRING", "lr": "DATA_TYPE_FLOAT64",
                     "steps": "DATA_TYPE_STRING", "nesterov": "DATA_TYPE_BOOL"}
    assert [m["name"]["tag"] for m in exp["metricInfos"]] == ["train/loss"]
    groups = _post(url + "data/plugin/hparams/session_groups", {
        "experimentName": "", "allowedStatuses": ["STATUS_SUCCESS"], "colParams": [],
        "startIndex": 0, "sliceSize": 10})
    (group,) = groups["sessionGroups"]
    # TensorBoard's table prints numbers with 5 significant digits: 100000 would be 1.0000e+5
    assert group["hparams"] == {"optimizer": "muon", "lr": 0.01, "steps": "100000",
                                "nesterov": True}
    assert group["metricValues"][0]["value"] == pytest.approx(1 / 3)


def _screenshot(url, path):
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    "--window-size=1200,800", "--virtual-time-budget=15000",
                    f"--screenshot={path}", url], capture_output=True, timeout=120, check=True)
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("L").copy()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt install "
                    "chromium) for the screenshot check")
@pytest.mark.parametrize("dashboard", ["text", "custom_scalars", "hparams"])
def test_a_browser_draws_each_dashboard(server, tmp_path, dashboard):
    """Each dashboard drawn with this run differs from the same dashboard with no data
    (TensorBoard's 'No ... data was found' page) over a real part of the page."""
    import numpy as np

    url, _ = server
    empty = tmp_path / "empty"
    empty.mkdir()
    proc, empty_url = start(empty, host="127.0.0.1", port=0, timeout=90)
    try:
        blank = np.asarray(_screenshot(empty_url + "#" + dashboard, tmp_path / "blank.png"))
    finally:
        stop(proc)
    shot = np.asarray(_screenshot(url + "#" + dashboard, tmp_path / f"{dashboard}.png"))
    assert shot.shape == blank.shape == (800, 1200)
    differs = np.abs(shot.astype(int) - blank.astype(int)) > 32
    assert differs[100:].mean() > 0.005, f"{dashboard}: the page looks empty"
