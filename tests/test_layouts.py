"""Custom-scalar layouts: exactly the panels whose topics a run emitted, read back from the
event file with TensorBoard's own reader and layout proto."""

import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

import hooks
import probe
from dashboards import TensorBoard
from dashboards.layouts import LOG10_TOPICS, build_layout


def _written(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    return layout, set(acc.Tags()["scalars"])


def _drive(logdir, emit_step, steps=3, **kw):
    bus = hooks.Bus()
    tb = TensorBoard(logdir, **kw)
    bus.subscribe(tb, "*")
    for s in range(steps):
        bus.begin_step(s)
        emit_step(bus, s)
        bus.end_step()
    bus.close()
    return tb


def _muon_kfac(bus, s):
    with bus.span("muon/newton_schulz"):
        pass
    bus.emit("time/kfac/eigh", 1.5)
    bus.emit("step/time_ms", 3.0)
    for p in ("w1", "w2"):
        bus.emit("muon/ns_residual", torch.tensor(0.01 * (s + 1)), param=p)
        bus.emit("muon/sv_min", torch.tensor(0.7), param=p)
        bus.emit("muon/sv_max", torch.tensor(1.1), param=p)
    bus.emit("kfac/cond_A", torch.tensor(100.0), param="fc")
    bus.emit("kfac/cond_G", torch.tensor(50.0), param="fc")
    bus.emit("kfac/jitter", 0.0, param="fc")
    bus.emit("kfac/policy", "eig: d_in 64 <= T 256", param="fc")
    bus.emit("muon/routing", "| w1 | ns |")
    if s == 1:
        bus.emit("anomaly/nonfinite", 1.0)


def test_layout_has_exactly_the_emitted_panels(tmp_path):
    tb = _drive(tmp_path, _muon_kfac)
    layout, scalars = _written(tmp_path)
    charts = {c.title: {ch.title for ch in c.chart} for c in layout.category}
    assert charts == {
        "Step": {"step time (ms)"},
        "Muon": {"Muon stage times (ms)", "NS residual ||I - XX^T||_F / sqrt(m)",
                 "singular values w1", "singular values w2"},
        "K-FAC": {"K-FAC stage times (ms)", "condition numbers, log10", "Cholesky jitter"},
        "Health": {"non-finite gradients"},
    }
    # each optimizer's panel before the generic ones
    assert [c.title for c in layout.category] == ["Muon", "K-FAC", "Step", "Health"]
    # no family that was not emitted, and the text topics stay out of the scalar layout
    assert not {"FALCON", "Blocks", "System", "Training"} & set(charts)
    # every chart entry names tags that were written, and every scalar tag is on a chart
    covered = set()
    for cat in layout.category:
        for ch in cat.chart:
            if ch.HasField("margin"):
                for s in ch.margin.series:
                    assert {s.value, s.lower, s.upper} <= scalars
                    covered |= {s.value, s.lower, s.upper}
                    assert s.lower.startswith("muon/sv_min/")
            else:
                for rx in ch.multiline.tag:
                    hit = {t for t in scalars if re.fullmatch(rx, t)}
                    assert len(hit) == 1, rx
                    covered |= hit
    # a quantity spanning decades is charted as its log10 twin (written beside it)
    linear_only = {t for t in scalars if t.split("/")[0] + "/" + t.split("/")[1]
                   in LOG10_TOPICS}
    assert linear_only == {"kfac/cond_A/fc", "kfac/cond_G/fc"}
    assert covered == scalars - linear_only
    assert tb.layout == build_layout(tb.scalar_tags)


def test_layout_is_rewritten_when_a_tag_appears(tmp_path):
    def emit(bus, s):
        bus.emit("falcon/mask_sparsity", 0.5, param="a")
        if s == 2:  # a parameter that joins late gets its line
            bus.emit("falcon/mask_sparsity", 0.25, param="b")
            bus.emit("blocks/active", 2.0)

    _drive(tmp_path, emit)
    layout, _ = _written(tmp_path)
    by = {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in layout.category}
    assert by == {"FALCON": {"mask sparsity": [r"^falcon/mask_sparsity/a$",
                                               r"^falcon/mask_sparsity/b$"]},
                  "Blocks": {"active set": [r"^blocks/active$"]}}


def test_build_layout_margin_needs_both_bounds_and_user_topics():
    lay = build_layout({"muon/sv_max": {"muon/sv_max/w"}, "user/lr": {"user/lr"},
                        "time/falcon/fft": {"time/falcon/fft"}})
    assert lay == {"FALCON": {"FALCON stage times (ms)": ["Multiline",
                                                          [r"^time/falcon/fft$"]]},
                   "User": {"lr": ["Multiline", [r"^user/lr$"]]}}
    assert build_layout({}) == {}
    with pytest.raises(ValueError, match="tags must be a mapping"):
        build_layout(["muon/sv_max"])


def test_hparams_validated_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="hparams must map"):
        TensorBoard(tmp_path / "x", hparams={"lr": [0.1]})
    assert not (tmp_path / "x").exists()
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="hparams must be a dict"):
        probe.attach(opt, logdir=tmp_path / "y", hparams=[("lr", 0.1)])
    assert not (tmp_path / "y").exists()
