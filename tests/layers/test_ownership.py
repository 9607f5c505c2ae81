"""The adapter layer owns its state: no module outside ``layers/`` assigns an adapter layer's fields.

Loading, banking, merging and diagnostics call ``AdapterLinear`` methods
(``install``, ``clear``, ``merge``, ``set_enabled``, ``freeze_A``...). This
test parses every ``.py`` under ``qlora/``, ``memory/`` and ``bench/`` and
fails on any assignment (or deletion) of a layer field on anything but
``self``: ``m.lora_A = ...``, ``object.__setattr__(m, "_unmerged_base", ...)``,
``m.__dict__[KEY] = ...``, ``setattr(m, "enabled", ...)``. It also checks that
``layers/lora.py``, ``layers/dora.py`` and ``layers/vera.py`` do not import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("qlora", "memory", "bench")
FIELDS = frozenset({
    "lora_A", "lora_B", "lora_magnitude_vector", "vera_lambda_b", "vera_lambda_d", "alpha", "use_rslora",
    "lora_dropout", "merged", "enabled",
    "base_layer",
})
# private attributes outside code once kept on the layers (merging's kept base, diagnostics' cached norm)
LEGACY_PRIVATE = frozenset({"_unmerged_base", "_qlora_w0_fro"})
_SETATTR_DUNDERS = ("__setattr__", "__delattr__")
_DICT_WRITES = ("update", "setdefault", "pop", "popitem", "clear", "__setitem__", "__delitem__")


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def _layer_private_names() -> frozenset[str]:
    """Private attributes the layer classes set on ``self``.

    Both ``self._x = ...`` and ``object.__setattr__(self, '_x', ...)`` count.
    """
    names = set()
    for path in (ROOT / "layers").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _is_self(node.value):
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    names.add(node.attr)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "__setattr__":
                if len(node.args) == 3 and _is_self(node.args[0]) and isinstance(node.args[1], ast.Constant):
                    names.add(node.args[1].value)
    return frozenset(names)


OWNED = FIELDS | LEGACY_PRIVATE | _layer_private_names()


def _constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "string"`` bindings, so ``m.__dict__[_KEY]`` resolves to the key it writes."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node.value.value
    return out


def _through_field(node: ast.AST) -> bool:
    """``m.lora_A.weight`` and the like: an expression reaching into an owned field of something but ``self``."""
    while isinstance(node, ast.Attribute):
        if node.attr in OWNED and not _is_self(node.value):
            return True
        node = node.value
    return False


def violations(source: str, filename: str = "<snippet>") -> list[str]:
    """``'file:line: what'`` for every write of an adapter-layer field on something other than ``self``.

    Also flags changing ``requires_grad`` through a field (``m.lora_A.weight.requires_grad_(False)``:
    LoRA-FA is ``freeze_A()``).
    """
    tree = ast.parse(source)
    consts = _constants(tree)
    found: list[str] = []

    def name_of(node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return consts.get(node.id) if isinstance(node, ast.Name) else None

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    def is_dict_of_other(node: ast.AST) -> bool:  # x.__dict__ or vars(x), x not self
        if isinstance(node, ast.Attribute) and node.attr == "__dict__":
            return not _is_self(node.value)
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "vars"
                and bool(node.args) and not _is_self(node.args[0]))

    def check_target(t: ast.AST) -> None:
        if isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                check_target(e)
        elif isinstance(t, ast.Starred):
            check_target(t.value)
        elif isinstance(t, ast.Attribute) and t.attr in OWNED and not _is_self(t.value):
            flag(t, f"assigns .{t.attr} on {ast.unparse(t.value)}")
        elif isinstance(t, ast.Attribute) and t.attr == "requires_grad" and _through_field(t.value):
            flag(t, f"assigns {ast.unparse(t)}")
        elif isinstance(t, ast.Subscript) and is_dict_of_other(t.value):
            key = name_of(t.slice)
            if key is None or key in OWNED:  # an unresolvable key could be any field
                flag(t, f"writes {ast.unparse(t)}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                check_target(t)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            check_target(node.target)
        elif isinstance(node, ast.Delete):
            for t in node.targets:
                check_target(t)
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("setattr", "delattr") and len(node.args) >= 2:
                key = name_of(node.args[1])
                if key in OWNED and not _is_self(node.args[0]):
                    flag(node, f"{f.id}(..., {key!r})")
            elif isinstance(f, ast.Attribute) and f.attr in _SETATTR_DUNDERS:
                # object.__setattr__(m, name, v) (unbound) or m.__setattr__(name, v) (bound)
                unbound = len(node.args) == (3 if f.attr == "__setattr__" else 2)
                if unbound:
                    obj, key_node = node.args[0], node.args[1]
                else:
                    obj, key_node = f.value, (node.args[0] if node.args else None)
                key = None if key_node is None else name_of(key_node)
                if not _is_self(obj) and (key is None or key in OWNED):
                    flag(node, f"{ast.unparse(f)}(... {key!r} ...)")
            elif isinstance(f, ast.Attribute) and f.attr in _DICT_WRITES and is_dict_of_other(f.value):
                flag(node, f"{ast.unparse(f)}(...)")
            elif isinstance(f, ast.Attribute) and f.attr == "requires_grad_" and _through_field(f.value):
                flag(node, f"{ast.unparse(f)}(...)")
    return found


def test_no_module_outside_layers_assigns_adapter_layer_fields():
    found = []
    for pkg in SCANNED:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            found += violations(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, "adapter-layer fields written outside layers/ (call an AdapterLinear method):\n" + "\n".join(
        found
    )


# How fields were rewritten before the layer owned its operations (one line each from the old code).
BEFORE = [
    "module.lora_A = LoRAFactor(conv(m.lora_A), trainable)",
    "module.alpha, module.use_rslora = float(m.alpha), m.use_rslora",
    "mod.lora_A = mod.lora_B = mod.lora_magnitude_vector = None",
    "m.lora_A, m.lora_B, m.lora_magnitude_vector = s.lora_A, s.lora_B, s.magnitude",
    "m.enabled = False",
    "layer.lora_A = layer.lora_B = None",
    "m.merged = True",
    "m.base_layer = _dense(base, w)",
    'object.__setattr__(m, "_unmerged_base", base)',
    'del m.__dict__["_unmerged_base"]',
    '_W0_NORM = "_qlora_w0_fro"\nmodule.__dict__[_W0_NORM] = cached',
    "module.lora_dropout = nn.Dropout(dropout)",
    'setattr(m, "enabled", False)',
    'm.__setattr__("lora_B", None)',
    'vars(m)["merged"] = True',
    "m.__dict__.update(merged=True)",
    "m.alpha += 1.0",
    "m._enabled = False",  # a private field of the layer classes, collected from layers/
    "module.lora_A.weight.requires_grad_(False)",  # LoRA-FA by hand
    "m.lora_A.weight.requires_grad = False",
]
ALLOWED = [
    "self.lora_A = LoRAFactor(a)",  # the layer itself
    "p.requires_grad_(False)",  # a parameter from model.parameters(): not reached through a layer field
    "self.lora_A.weight.requires_grad_(False)",  # the layer's own freeze_A
    "with torch.no_grad():\n    m.lora_B.weight.normal_()",
    "x = m.lora_A; r = m.rank; cfg.rank = 3",
    "setattr(parent, child, new)",  # generic module replacement (replace_module)
    'BANK = "qlora_adapters"\nobject.__setattr__(model, BANK, {})',
    "model.config.use_cache = False",
]


@pytest.mark.parametrize("source", BEFORE)
def test_checker_catches_how_fields_were_rewritten(source):
    assert violations(source), source


@pytest.mark.parametrize("source", ALLOWED)
def test_checker_allows_the_layer_itself_and_plain_reads(source):
    assert violations(source) == []


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ("layers." if node.level else "") + (node.module or "")
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def test_the_variants_do_not_import_each_other():
    variants = ("lora", "dora", "vera")
    for name in variants:
        imported = _imported_modules(ROOT / f"layers/{name}.py")
        others = [f"layers.{v}" for v in variants if v != name]
        assert not any(m.startswith(o) for m in imported for o in others), (name, imported)


def test_layers_depend_on_torch_and_quant_errors_only():
    """``memory`` and ``qlora`` both import ``layers``; it must never pull either of them in."""
    allowed = ("__future__", "math", "itertools", "collections.abc", "torch", "quant.errors", "layers")
    for path in sorted((ROOT / "layers").glob("*.py")):
        for mod in _imported_modules(path):
            assert any(mod == p or mod.startswith(p + ".") for p in allowed), f"layers/{path.name} imports {mod}"
