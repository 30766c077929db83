"""Parameter names for telemetry tags."""

from __future__ import annotations

import re

import torch

_UNSAFE = re.compile(r"[^A-Za-z0-9_.:\-\[\]x]")


def safe_name(name: str) -> str:
    """``name`` made safe as a tag or a file-name part: no path separators or ``..``."""
    cleaned = _UNSAFE.sub("_", str(name))
    while ".." in cleaned:
        cleaned = cleaned.replace("..", "_")
    return cleaned.strip(".") or "_"


def parameter_names(optimizer: torch.optim.Optimizer,
                    model: torch.nn.Module | None = None) -> dict[int, str]:
    """Map ``id(param)`` to its name: from ``model.named_parameters()``, from named param
    groups (``param_names``), else ``group{g}.{i}:<shape>``."""
    from_model = {}
    if model is not None:
        from_model = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    names: dict[int, str] = {}
    for g, group in enumerate(optimizer.param_groups):
        group_names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if id(p) in from_model:
                name = from_model[id(p)]
            elif group_names is not None and i < len(group_names):
                name = group_names[i]
            else:
                name = f"group{g}.{i}:" + "x".join(str(s) for s in p.shape)
            names[id(p)] = safe_name(name)
    return names


def module_of(name: str) -> str:
    """The module part of a parameter name (``blocks.3.attn.weight`` -> ``blocks.3.attn``);
    a top-level parameter (``scale``) or a made-up name (``group0.1:3x2``) is its own."""
    if ":" in name or "." not in name:
        return name
    return name.rsplit(".", 1)[0]
