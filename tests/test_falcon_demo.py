"""``probe demo --optimizer falcon``: Falcon's own telemetry lands in the TensorBoard run."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import hooks
from optimizers import Falcon
from probe.cli import main
from probe.demo import OPTIMIZERS, DigitsNet


def test_demo_runs_falcon_and_writes_its_topics(tmp_path, capsys):
    rc = main(["demo", "--optimizer", "falcon", "--steps", "6", "--every", "5",
               "--runs", str(tmp_path), "--name", "t", "--no-progress"])
    assert rc == 0
    assert "falcon" in capsys.readouterr().out
    acc = EventAccumulator(str(tmp_path / "t-falcon"), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    conv = "blocks.1.0.weight"
    for tag in (f"falcon/retained_energy/{conv}", f"falcon/lowrank_residual/{conv}",
                f"falcon/mask_recomputed/{conv}", f"time/falcon/fft/{conv}",
                "falcon/filtered_fraction", "falcon/retain_target", "time/falcon/adamw",
                f"grad/norm/{conv}"):
        assert tag in scalars, tag
    assert [s.step for s in acc.Scalars("falcon/retain_target")] == [0, 5]


def test_demo_factory_filters_the_three_convs():
    opt = OPTIMIZERS["falcon"](DigitsNet(), 100)
    assert isinstance(opt, Falcon) and opt.total_steps == 100
    assert opt.filtered_names == ["blocks.0.0.weight", "blocks.1.0.weight", "blocks.2.0.weight"]
    assert isinstance(opt.bus, hooks.Bus)
