"""No code path unpickles untrusted data: every ``torch.load`` in the project passes
``weights_only=True`` (torch's safe loader), and nothing calls ``pickle.load`` or ``eval``."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("hooks", "dashboards", "optimizers", "probe", "scripts", "tests")


def _sources():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = f.value.id if isinstance(f, ast.Attribute) and \
                isinstance(f.value, ast.Name) else ""
            yield owner, name, node


def unsafe_calls(source: str, filename: str = "<src>") -> list[tuple[int, str]]:
    """(line, call) of each torch.load without weights_only=True, pickle load and eval/exec."""
    out = []
    for owner, name, node in _calls(ast.parse(source, filename)):
        if owner == "torch" and name == "load":
            v = {k.arg: k.value for k in node.keywords}.get("weights_only")
            if not (isinstance(v, ast.Constant) and v.value is True):
                out.append((node.lineno, "torch.load"))
        elif (owner in ("pickle", "cPickle", "dill") and name in ("load", "loads")) \
                or (owner == "" and name in ("eval", "exec")):
            out.append((node.lineno, f"{owner + '.' if owner else ''}{name}"))
    return out


def test_no_unsafe_deserialization_in_the_project():
    bad = [f"{path.relative_to(ROOT)}:{line} {call}" for path in _sources()
           for line, call in unsafe_calls(path.read_text(), str(path))]
    assert not bad, f"unsafe loads (use torch.load(..., weights_only=True)): {bad}"


def test_the_scan_reports_each_unsafe_form():
    src = ("import torch, pickle\n"
           "a = torch.load('f.pt')\n"
           "b = torch.load('g', weights_only=True)\n"
           "c = torch.load('h', weights_only=False)\n"
           "d = pickle.loads(b'')\n"
           "e = eval('1')\n")
    assert unsafe_calls(src) == [(2, "torch.load"), (4, "torch.load"), (5, "pickle.loads"),
                                 (6, "eval")]
