"""One owner per setting: a setting's default is written once, in maskrcnn/config.py. Everywhere else (the
library, the tools, the Makefile) a default of a configured setting is None ("the model's own") or names
maskrcnn.config (``DISPLAY_SCORE_THRESH``, ``RoIHeadsConfig.mask_threshold``).

Settings are found by name, never by value, so that a 0.5 pixel offset is not taken for a threshold. The
names are the fields of the dataclasses of maskrcnn/config.py, as a flag or a parameter spells them
(``--score-thresh``; ``--nms-iou`` for ``nms_thresh``; ``--detections-per-image`` for ``detections_per_img``),
and the names a setting is passed down under: ``to_original_image(..., memory_mb=self.paste_memory_mb)``
makes ``memory_mb`` of ``to_original_image`` a setting, and so on down to the paste. Checked:
- keyword defaults of functions and constructors, and module or class constants, in maskrcnn/ and tools/;
- literal keyword arguments of calls there (``paste(..., threshold=0.5)``, ``parser.set_defaults(...)``);
- the defaults of the tools' ``add_argument`` options;
- ``--option value`` and ``key.sub=value`` arguments in the Makefile.
"""

import ast
import dataclasses
import inspect
import re
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest
import torch

from tiny import tiny_config
import maskrcnn.config
from maskrcnn.deploy.runtime import ExportedPredictor
from maskrcnn.inference import detect
from maskrcnn.predictor import Predictor
from maskrcnn.visualize import draw_instances

ROOT = Path(__file__).parents[1]
OWNER = "maskrcnn/config.py"
SOURCES = sorted(path for path in (str(p.relative_to(ROOT)) for p in [*(ROOT / "maskrcnn").rglob("*.py"),
                                                                     *(ROOT / "tools").glob("*.py")])
                 if path != OWNER)

# Field names that are also plain words for other things, with why a parameter of that name elsewhere is not
# the field's setting.
NOT_SETTINGS = {
    "seed": "train.seed seeds a training run; a dataset split or a figure's sampling has a seed of its own",
    "device": "train.device is where training runs; inference runs on the device its caller names",
    "width": "model.backbone.width counts channels; an image or a thumbnail width counts pixels",
    "depth": "model.backbone.depth counts ResNet layers; a queue or a recursion has a depth of its own",
    "categories": "shapes.categories names a set of shapes; elsewhere categories are a dataset's category dicts",
}
# How flags and parameters spell the words of the field names.
SPELLINGS = {"threshold": "thresh", "iou": "thresh", "image": "img"}


def spelling(name: str) -> str:
    """A flag, parameter or field name in one spelling: ``--NMS-IoU`` and ``nms_iou`` -> ``nms_thresh``."""
    words = name.lstrip("-").lower().replace("-", "_").split("_")
    return "_".join(SPELLINGS.get(word, word) for word in words)


def _config_fields() -> Set[str]:
    """The names of the fields of every dataclass of maskrcnn/config.py, sections (``model``, ...) left out."""
    classes = [c for c in vars(maskrcnn.config).values()
               if dataclasses.is_dataclass(c) and isinstance(c, type) and c.__module__ == maskrcnn.config.__name__]
    return {f.name for c in classes for f in dataclasses.fields(c)
            if not dataclasses.is_dataclass(getattr(c(), f.name))}


SETTINGS = {spelling(name) for name in _config_fields()} - {spelling(name) for name in NOT_SETTINGS}
CONFIG_KEYS = set(maskrcnn.config._all_keys())
Alias = Tuple[str, str]  # (function as its callers name it, parameter)


def _is_literal(node: ast.AST) -> bool:
    """A value written out (``0.5``, ``"fp32"``, ``-1``, ``[800]``, ``20 * 2**20``), None excepted."""
    if isinstance(node, ast.Constant):
        return node.value is not None
    return not any(isinstance(n, (ast.Name, ast.Attribute, ast.Call)) for n in ast.walk(node))


def _callee(call: ast.Call) -> Optional[str]:
    return call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", None)


def _parameters(function: ast.FunctionDef) -> List[str]:
    """Parameter names as callers pass them: ``self`` / ``cls`` left out."""
    args = function.args
    names = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]]
    return names[1:] if names[:1] in (["self"], ["cls"]) else names


def _defaults(function: ast.FunctionDef) -> Iterator[Tuple[ast.arg, ast.AST]]:
    args = function.args
    positional = [*args.posonlyargs, *args.args]
    yield from zip(positional[len(positional) - len(args.defaults):], args.defaults)
    yield from ((arg, d) for arg, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None)


def _add_argument_dest(call: ast.Call) -> Optional[str]:
    dest = next((k.value.value for k in call.keywords if k.arg == "dest" and isinstance(k.value, ast.Constant)), None)
    flags = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return dest or next((f for f in flags if f.startswith("--")), flags[0] if flags else None)


class Module:
    """One source file as the check reads it."""

    def __init__(self, path: str, source: str):
        self.path = path
        self.tree = ast.parse(source, filename=path)
        # (the name callers use, definition): a class's __init__ is called by the class's name
        self.functions: List[Tuple[str, ast.FunctionDef]] = []
        # (enclosing function's name or None, its parameters, the name of the function called, call)
        self.calls: List[Tuple[Optional[str], Set[str], Optional[str], ast.Call]] = []
        self._visit(self.tree, None, set(), None, None)
        self.config_names: Set[str] = set()  # names imported from maskrcnn.config
        self.foreign: Set[str] = set()  # names imported from other libraries
        package = path.split("/")[:-1]
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                module = ".".join(package[: len(package) - node.level + 1] + (node.module or "").split(".")).strip(".")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            else:
                continue
            if module == "maskrcnn.config":
                self.config_names |= {alias.asname or alias.name for alias in node.names}
            elif not module.startswith("maskrcnn"):
                self.foreign |= {alias.asname or alias.name.split(".")[0] for alias in node.names}

    def _visit(self, node: ast.AST, caller: Optional[str], params: Set[str], cls: Optional[str],
               method_of: Optional[str]) -> None:
        """cls: the class whose body ``node`` is in; method_of: the class of the enclosing method (``cls(...)``
        inside a classmethod calls it)."""
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = cls if child.name == "__init__" and cls else child.name
                self.functions.append((name, child))
                self._visit(child, name, set(_parameters(child)), None, cls or method_of)
            elif isinstance(child, ast.ClassDef):
                self._visit(child, caller, params, child.name, method_of)
            else:
                if isinstance(child, ast.Call):
                    callee = _callee(child)
                    self.calls.append((caller, params, method_of if callee == "cls" else callee, child))
                self._visit(child, caller, params, cls, method_of)

    def names_config(self, node: ast.AST) -> bool:
        """Whether ``node`` derives from maskrcnn.config: it reads a name imported from there that exists."""
        for sub in ast.walk(node):
            chain = []
            while isinstance(sub, ast.Attribute):
                chain.insert(0, sub.attr)
                sub = sub.value
            if isinstance(sub, ast.Name) and sub.id in self.config_names:
                chain.insert(0, sub.id)
            elif not (isinstance(sub, ast.Name) and sub.id == "maskrcnn" and chain[:1] == ["config"]):
                continue
            owner = maskrcnn
            for attr in chain if chain[:1] == ["config"] else ["config", *chain]:
                owner = getattr(owner, attr, None)
            if owner is not None:
                return True
        return False

    def allowed(self, default: ast.AST) -> bool:
        """None ("the model's own") or a value taken from maskrcnn.config."""
        return (isinstance(default, ast.Constant) and default.value is None) or self.names_config(default)


def accepted_keywords(modules: List[Module]) -> Dict[str, Set[str]]:
    """The keywords each function of the sources takes: its named parameters, and through ``**kwargs``
    passed on to another function (``Predictor.from_checkpoint(path, **kwargs)`` -> ``cls(..., **kwargs)``),
    that one's. A ``**kwargs`` kept to itself (``require_at_least(args, **minimums)``) takes no setting."""
    accepted: Dict[str, Set[str]] = {}
    forwards: Dict[str, Set[str]] = {}
    for module in modules:
        for name, function in module.functions:
            accepted.setdefault(name, set()).update(_parameters(function))
            kwargs = function.args.kwarg.arg if function.args.kwarg else None
            forwards.setdefault(name, set()).update(
                callee for caller, _, callee, call in module.calls if caller == name and kwargs and any(
                    k.arg is None and isinstance(k.value, ast.Name) and k.value.id == kwargs for k in call.keywords))
    changed = True
    while changed:
        changed = False
        for name, callees in forwards.items():
            more = set().union(*(accepted.get(c, set()) for c in callees)) - accepted[name]
            accepted[name] |= more
            changed |= bool(more)
    return accepted


def aliases_of(modules: List[Module]) -> Set[Alias]:
    """(function, parameter) pairs that take a setting under another name: those whose default names
    maskrcnn.config, and those a setting is passed to, followed through calls to a fixed point
    (``f(x=self.mask_threshold)`` makes ``x`` of ``f`` one; ``g(y=x)`` inside ``f`` then ``y`` of ``g``)."""
    parameters: Dict[str, List[List[str]]] = {}
    aliases: Set[Alias] = set()
    for module in modules:
        for name, function in module.functions:
            parameters.setdefault(name, []).append(_parameters(function))
            aliases |= {(name, arg.arg) for arg, default in _defaults(function) if module.names_config(default)}

    def carries(value: ast.AST, caller: Optional[str], params: Set[str]) -> bool:
        if isinstance(value, ast.Attribute):
            return spelling(value.attr) in SETTINGS
        if isinstance(value, ast.Name):
            return spelling(value.id) in SETTINGS or (value.id in params and (caller, value.id) in aliases)
        return False

    while True:
        found = set()
        for module in modules:
            for caller, params, callee, call in module.calls:
                for names in parameters.get(callee, []):
                    passed = list(zip(names, call.args)) + [(k.arg, k.value) for k in call.keywords if k.arg]
                    found |= {(callee, name) for name, value in passed if carries(value, caller, params)}
        if found <= aliases:
            return aliases
        aliases |= found


def findings_in(module: Module, aliases: Set[Alias], accepted: Dict[str, Set[str]]) -> List[str]:
    """Every setting whose default or value ``module`` writes out instead of taking it from maskrcnn.config.

    A literal keyword argument counts where the function called takes that keyword (``accepted``), or is not
    one of the sources' (``parser.set_defaults(...)``), but not another library's named import, whose
    keywords are its own parameters (``torchvision.ops.roi_align(..., sampling_ratio=0)``)."""
    out = []

    def names_setting(name: str, function: Optional[str]) -> bool:
        return spelling(name) in SETTINGS or (function, name) in aliases

    def report(node: ast.AST, name: str, value: ast.AST) -> None:
        out.append(f"{module.path}:{node.lineno}: {name} = {ast.unparse(value)}")

    for name, function in module.functions:
        for arg, default in _defaults(function):
            if names_setting(arg.arg, name) and not module.allowed(default):
                report(default, arg.arg, default)
    for _, _, callee, call in module.calls:
        foreign = isinstance(call.func, ast.Name) and callee in module.foreign
        for keyword in [] if foreign else call.keywords:
            if (keyword.arg and keyword.arg in accepted.get(callee, {keyword.arg})
                    and names_setting(keyword.arg, callee) and _is_literal(keyword.value)):
                report(keyword.value, keyword.arg, keyword.value)
        if callee == "add_argument":
            dest = _add_argument_dest(call)
            default = next((k.value for k in call.keywords if k.arg == "default"), None)
            if dest and spelling(dest) in SETTINGS and default is not None and not module.allowed(default):
                report(call, dest, default)
    for scope in [module.tree, *(n for n in ast.walk(module.tree) if isinstance(n, ast.ClassDef))]:
        for node in scope.body:
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, ast.AnnAssign) else [])
            for target in targets:
                if (isinstance(target, ast.Name) and spelling(target.id) in SETTINGS and node.value is not None
                        and not module.allowed(node.value)):
                    report(node, target.id, node.value)
    return sorted(out, key=lambda f: int(f.split(":")[1]))


def makefile_findings(text: str, path: str = "Makefile") -> List[str]:
    """``--option value`` and ``key.sub=value`` arguments of the Makefile that write out a setting's value
    (a value from a make variable, ``$(...)``, is the Makefile's own; comments are skipped)."""
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("#"):
            continue
        for flag, value in re.findall(r"(?<!\S)(--[A-Za-z][\w-]*)(?:=| +)([^\s$\\-]\S*)", line):
            if spelling(flag) in SETTINGS:
                out.append(f"{path}:{number}: {flag} {value}")
        for key, value in re.findall(r"(?<![\w.$(])([a-z_]+(?:\.[a-z_]+)+)=([^\s$]\S*)", line):
            if key in CONFIG_KEYS:
                out.append(f"{path}:{number}: {key}={value}")
    return out


@lru_cache(maxsize=None)
def _modules() -> Dict[str, Module]:
    return {path: Module(path, (ROOT / path).read_text()) for path in SOURCES}


@lru_cache(maxsize=None)
def _tree_aliases() -> frozenset:
    return frozenset(aliases_of(list(_modules().values())))


@lru_cache(maxsize=None)
def _tree_keywords() -> Dict[str, Set[str]]:
    return accepted_keywords(list(_modules().values()))


def findings_with(path: str, source: str) -> List[str]:
    """What the check finds in ``source`` put in place of ``path`` (a new file or a changed one)."""
    changed = Module(path, source)
    modules = [module for other, module in _modules().items() if other != path] + [changed]
    return findings_in(changed, aliases_of(modules), accepted_keywords(modules))


@pytest.mark.parametrize("path", SOURCES)
def test_setting_defaults_are_written_only_in_config(path):
    found = findings_in(_modules()[path], _tree_aliases(), _tree_keywords())
    assert not found, ("defaults of configured settings written here; pass None (the model's own) or name "
                       "maskrcnn.config:\n" + "\n".join(found))


def test_the_makefile_writes_no_setting():
    found = makefile_findings((ROOT / "Makefile").read_text())
    assert not found, "the Makefile sets these itself; leave them to the configuration:\n" + "\n".join(found)


# --- The check finds what it is about: each case below, in a new tool or a copy of a library file. ----------

def _new_tool(line: str) -> List[str]:
    """What the check finds in a new tool whose ``main`` runs ``line``."""
    return findings_with("tools/new_tool.py", "import argparse\n\n"
                                              "from maskrcnn.cli import require_at_least\n"
                                              "from maskrcnn.predictor import Predictor\n\n\n"
                                              "def main(argv=None):\n"
                                              "    parser = argparse.ArgumentParser()\n"
                                              f"    {line}\n"
                                              "    args = parser.parse_args(argv)\n")


@pytest.mark.parametrize("line, name", [
    ('parser.add_argument("--nms-iou", type=float, default=0.5)', "nms-iou"),
    ('parser.add_argument("--detections-per-image", type=int, default=100)', "detections-per-image"),
    ('parser.add_argument("--min-size", type=int, default=800)', "min-size"),
    ('parser.add_argument("--max-size", type=int, default=1333)', "max-size"),
    ('parser.add_argument("--thresh", dest="score_thresh", type=float, default=0.5)', "score_thresh"),
    ("parser.set_defaults(score_thresh=0.05)", "score_thresh"),
    ('parser.add_argument("--precision", default="fp32")', "precision"),
    ('parser.add_argument("--mask-threshold", type=float, default=0.5)', "mask-threshold"),
])
def test_a_tool_option_with_a_written_default_is_found(line, name):
    found = _new_tool(line)
    assert len(found) == 1 and (f": {name} = " in found[0] or f": --{name} = " in found[0]), found


@pytest.mark.parametrize("path, old, new, name", [
    ("maskrcnn/modeling/paste.py", "threshold: float = RoIHeadsConfig.mask_threshold,", "threshold: float = 0.5,",
     "threshold"),
    ("maskrcnn/modeling/paste.py", "memory_mb: float = ModelConfig.paste_memory_mb,", "memory_mb: float = 256,",
     "memory_mb"),
    ("maskrcnn/modeling/postprocess.py", "mask_threshold: float = RoIHeadsConfig.mask_threshold",
     "mask_threshold: float = 0.5", "mask_threshold"),
    ("maskrcnn/modeling/maskrcnn.py", "mask_threshold: float, paste_memory_mb: int,",
     "mask_threshold: float = 0.5, paste_memory_mb: int = 256,", "paste_memory_mb"),
    ("maskrcnn/inference.py", "precision: Optional[str] = None, label_to_cat_id",
     'precision: str = "fp32", label_to_cat_id', "precision"),
    ("maskrcnn/diagnostics/trace.py", "score_thresh: float = DISPLAY_SCORE_THRESH,", "score_thresh: float = 0.5,",
     "score_thresh"),
    ("maskrcnn/data/shapes.py", "min_size: int = ShapesConfig.min_size,", "min_size: int = 128,", "min_size"),
    ("maskrcnn/modeling/postprocess.py", "threshold=mask_threshold,\n", "threshold=0.5,\n", "threshold"),
])
def test_a_written_library_default_is_found(path, old, new, name):
    source = (ROOT / path).read_text()
    assert old in source, f"{path} no longer holds {old!r}: update the case"
    assert not findings_with(path, source)
    found = findings_with(path, source.replace(old, new, 1))
    assert any(f": {name} = " in f for f in found), found


def test_a_literal_passed_on_to_a_setting_is_found():
    """Through ``**kwargs`` too: ``Predictor.from_checkpoint`` hands its keywords to the constructor."""
    assert _new_tool("Predictor.from_checkpoint(args.checkpoint, score_thresh=0.5)") == \
        ["tools/new_tool.py:9: score_thresh = 0.5"]
    assert _new_tool("Predictor.from_checkpoint(args.checkpoint, precision='fp32')") == \
        ["tools/new_tool.py:9: precision = 'fp32'"]


def test_a_bound_that_is_not_a_default_is_not_found():
    """``require_at_least`` keeps its ``**minimums`` to itself: a lower bound, not a setting's value."""
    assert _new_tool("require_at_least(args, num_workers=0, detections_per_img=1)") == []


def test_a_module_constant_named_like_a_setting_is_found():
    assert findings_with("maskrcnn/new.py", "MASK_THRESHOLD = 0.5\n") == ["maskrcnn/new.py:1: MASK_THRESHOLD = 0.5"]


def test_values_that_are_not_settings_are_not_found():
    source = ("from maskrcnn.config import DISPLAY_SCORE_THRESH, RoIHeadsConfig\n"
              "def centre(x0, x1, alpha=0.5, levels=(0.5,), seed=0):\n"
              "    return contour(x0 + 0.5 * (x1 - x0), levels=[0.5])\n"
              "def draw(score_thresh=DISPLAY_SCORE_THRESH, mask_threshold=RoIHeadsConfig.mask_threshold,\n"
              "         nms_thresh=None):\n"
              "    pass\n")
    assert findings_with("maskrcnn/new.py", source) == []


def test_a_name_that_is_not_from_config_is_found():
    source = "from maskrcnn.modeling.paste import THRESHOLD\ndef f(mask_threshold=THRESHOLD):\n    pass\n"
    assert findings_with("maskrcnn/new.py", source) == ["maskrcnn/new.py:2: mask_threshold = THRESHOLD"]


@pytest.mark.parametrize("line", ["	$(PY) tools/infer.py --input x --score-thresh 0.5 --label-map",
                                  "	$(PY) tools/train.py --config c.yaml model.roi_heads.mask_threshold=0.4",
                                  "	$(PY) tools/eval.py --precision=fp32"])
def test_a_setting_in_the_makefile_is_found(line):
    assert len(makefile_findings(line + "\n")) == 1


def test_the_makefile_may_pass_its_own_variables():
    assert not makefile_findings("	$(PY) tools/train.py --config $(DEMO_CONFIG) train.output_dir=$(DEMO)\n"
                                 "# make demo DEMO_OVERRIDES=\"solver.max_iter=100\"\n")


def test_the_tools_options_of_settings_are_seen():
    """The check sees the options it is about: the threshold and precision flags of the tools."""
    options = {path: [_add_argument_dest(call) for _, _, callee, call in module.calls
                      if callee == "add_argument" and spelling(_add_argument_dest(call) or "") in SETTINGS]
               for path, module in _modules().items() if path.startswith("tools/")}
    for tool in ("infer", "serve", "export", "explain"):
        assert "--score-thresh" in options[f"tools/{tool}.py"], tool
    for tool in ("infer", "eval", "serve"):
        assert "--precision" in options[f"tools/{tool}.py"], tool


# --- Who decides when nothing is passed. --------------------------------------------------------------------

@pytest.mark.parametrize("function, name", [(Predictor.__init__, "score_thresh"),
                                            (ExportedPredictor.__init__, "score_thresh"),
                                            (Predictor.__init__, "precision"), (detect, "precision")])
def test_predictors_default_to_the_models_own_setting(function, name):
    assert inspect.signature(function).parameters[name].default is None


def test_drawing_defaults_to_the_configs_display_threshold():
    assert inspect.signature(draw_instances).parameters["score_thresh"].default is maskrcnn.config.DISPLAY_SCORE_THRESH


def test_predictor_keeps_the_configured_threshold_by_default(tmp_path):
    cfg = tiny_config()
    cfg.model.roi_heads.score_thresh = 0.2
    assert Predictor(cfg, None).model.roi_heads.score_thresh == 0.2
    assert Predictor(cfg, None, score_thresh=0.3).model.roi_heads.score_thresh == 0.3
    path = tmp_path / "model.pth"
    torch.save({"model": Predictor(cfg, None).model.state_dict(), "config": maskrcnn.config.config_to_dict(cfg)}, path)
    assert Predictor.from_checkpoint(path).model.roi_heads.score_thresh == 0.2
