"""Gate: the cost of ``bus.span`` around the stages of a step, idle and timed, vs no spans.

The work is eight 96x96 matmul stages (tens of microseconds each on CPU), the grain of the
stages the optimizers wrap (newton_schulz, fft, eigh, ...), inside begin_step/end_step.
Measured on CPU: about 1 us per idle span plus 2.5 us for begin/end_step, about 4 us per timed
span with its delivery, against about 20 us per stage; the bounds leave room for noise above
that, so a regression of a microsecond per span shows.
"""

import pytest
import torch

import hooks

STAGES = ("muon/newton_schulz", "falcon/fft", "falcon/mask", "falcon/lowrank", "falcon/ifft",
          "kfac/factors", "kfac/eigh", "kfac/precondition")


class _Sink:
    def handle(self, events):
        self.last = events


def _work():
    torch.manual_seed(0)
    return [torch.randn(96, 96) for _ in STAGES]


def _bare(mats):
    def step():
        for m in mats:
            torch.mm(m, m)

    return step


def _spanned(bus, mats):
    counter = [0]

    def step():
        bus.begin_step(counter[0])
        for name, m in zip(STAGES, mats):
            with bus.span(name):
                torch.mm(m, m)
        bus.end_step()
        counter[0] += 1

    return step


@pytest.mark.parametrize("listening,max_ratio", [(False, 1.12), (True, 1.35)],
                         ids=["idle", "timed"])
def test_span_cost(probe_gate, listening, max_ratio):
    bus = hooks.Bus()
    if listening:
        bus.subscribe(_Sink(), "time/*")
    with torch.inference_mode():
        probe_gate(_spanned(bus, _work()), _bare(_work()), max_ratio=max_ratio, warmup=20,
                   rounds=300, inner=5,
                   label=f"span cost, 8 stages of 96x96 matmul, {'timed' if listening else 'idle'}")
