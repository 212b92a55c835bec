"""The arrows point down: the engine knows nothing of the Python API, Session or server (it is typed against the
model contract and the tokenizer), quantization knows nothing of evaluation, and every model family satisfies the
contract the engine and calibration rely on."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from mlxq.models import REGISTRY
from mlxq.models.base import CausalLM

ROOT = Path(__file__).parent.parent / "mlxq"


def imported(package: str) -> dict[str, set[str]]:
    """file -> every module it imports (at the top or inside functions), its CLI verb (`command.py`) included: a
    verb that composes another package's verb reaches it through the command line (`mlxq quantize --report` runs
    `mlxq eval kl`), never by importing a package above its own."""
    out = {}
    for path in sorted((ROOT / package).glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        out[path.name] = names
    return out


@pytest.mark.parametrize(("package", "banned"), [
    ("engine", ("mlxq.api", "mlxq.session", "server", "mlxq.eval", "mlxq.quant")),
    ("models", ("mlxq.api", "mlxq.session", "server", "mlxq.eval", "mlxq.quant")),
    ("quant", ("mlxq.eval", "mlxq.api", "server")),
])
def test_no_import_runs_back_up(package, banned):
    for name, modules in imported(package).items():
        bad = sorted(m for m in modules if m.startswith(banned))
        assert not bad, f"mlxq/{package}/{name} imports {bad}"


@pytest.mark.parametrize("module", sorted(set(REGISTRY.values())))
def test_every_family_satisfies_the_model_contract(module):
    model_cls = importlib.import_module(f"mlxq.models.{module}").Model
    assert issubclass(model_cls, CausalLM)
    assert model_cls.make_cache is not CausalLM.make_cache  # each family says which cache each layer needs


@pytest.mark.parametrize("call", ["request", "stream", "astream", "generate", "agenerate"])
def test_model_calls_take_options_not_internals(call):
    """Model's generation calls take a prompt and the documented options; the engine's caches, slots and
    generation state stay inside (a Session hands its cache slot to the engine on the request it gets back)."""
    from mlxq.api import Model

    params = inspect.signature(getattr(Model, call)).parameters
    internals = {"cache", "cached_tokens", "generation", "slot", "caches", "engine"}
    assert not internals & set(params), f"Model.{call} exposes {sorted(internals & set(params))}"
    assert list(params)[:2] == ["self", "prompt"]
