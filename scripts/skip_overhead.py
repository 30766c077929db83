"""Median AdamW step time (CPU) with no probe, the probe, and the probe with on_nonfinite=skip."""
import sys, time; sys.path.insert(0,'.')
import torch, hooks, probe
from torch import nn
from tests.helpers import Recorder
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
x = torch.randn(64, 256)
def run(mode, n=300):
    opt = torch.optim.AdamW(model.parameters())
    kw = {} if mode == "none" else {"on_nonfinite": mode}
    ctx = probe.attach(opt, model=model, every=10, collectors=[Recorder()], bus=hooks.Bus(), **kw) if mode != "none" else None
    model(x).sum().backward()
    ts=[]
    for i in range(n):
        t=time.perf_counter(); opt.step(); ts.append(time.perf_counter()-t)
    if ctx: ctx.close()
    ts.sort(); return ts[len(ts)//2]*1e6
for m in ["none","report","skip","none","report","skip"]:
    print(m, f"{run(m):.1f} us median step")
