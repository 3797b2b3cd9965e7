"""Every third-party module our code imports is installed by the dependencies or by the extra that module needs.

A missing install step must fail here, whatever this machine happens to have installed: the check reads
pyproject.toml and the installed packages' own requirement lists, not what is importable.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS_OF = {  # the modules that need an extra, and which
    "hf_longattn/datatrove.py": ("datatrove",),
    "recipes/longabc_datatrove.py": ("datatrove", "ray"),  # --executor ray: datatrove's RayPipelineExecutor
    "hf_longattn/ray.py": ("ray",),
    "recipes/longabc_ray.py": ("ray",),
    "hf_longattn/plots.py": ("plots",),
    "hf_longattn/probe/report.py": ("plots",),
    "hf_longattn/triton_stats.py": ("triton",),
    "hf_longattn/model_loading.py": ("gguf",),
}


def name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def closure(requirements: list[str]) -> set[str]:
    """Distributions these requirements install, with what those require in turn (their extras honoured)."""
    environment = default_environment()
    seen: set[tuple[str, str]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        new = [(name(str(requirement)), e) for e in ("", *requirement.extras) if (name(str(requirement)), e) not in seen]
        seen.update(new)
        try:
            requires = metadata.requires(requirement.name) or [] if new else []
        except metadata.PackageNotFoundError:
            continue  # not installed here: its own requirements cannot be read, its name is enough
        for line in requires:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({**environment, "extra": e}) for _, e in new):
                todo.append(sub)
    return {dist for dist, _ in seen}


def extra(*names: str) -> list[str]:
    """The requirements of the dependencies plus these extras, our own extras (``hf-longattn[...]``) expanded."""
    environment = default_environment()
    requirements, todo = [], [*PYPROJECT["dependencies"],
                              *(r for n in names for r in PYPROJECT["optional-dependencies"][n])]
    while todo:
        requirement = Requirement(todo.pop())
        if requirement.marker is not None and not requirement.marker.evaluate({**environment, "extra": ""}):
            continue
        if name(str(requirement)) == "hf-longattn":
            todo += [r for n in requirement.extras for r in PYPROJECT["optional-dependencies"][n]]
        else:
            requirements.append(str(requirement))
    return requirements


def third_party_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m not in ("hf_longattn", "__future__")}


def distributions(module: str) -> set[str]:
    return {re.sub(r"[-_.]+", "-", d).lower() for d in metadata.packages_distributions().get(module, [])}


SOURCES = sorted([*ROOT.glob("hf_longattn/**/*.py"), *ROOT.glob("recipes/*.py")])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_import_is_installed_by_the_dependencies_or_its_extra(path):
    relative = str(path.relative_to(ROOT))
    installed = closure(extra(*EXTRAS_OF.get(relative, ())))
    for module in third_party_imports(path):
        owners = distributions(module)
        assert owners, f"{relative} imports {module!r}, which no installed distribution provides"
        assert owners & installed, (f"{relative} imports {module!r} ({sorted(owners)}), which neither the dependencies "
                                    f"nor the extra(s) {EXTRAS_OF.get(relative, ())} install")


def test_datatroves_own_step_dependencies_are_in_the_datatrove_extra():
    """datatrove checks a step's extra packages only when the step is built (JsonlWriter needs orjson)."""
    source = (ROOT / "hf_longattn/datatrove.py").read_text() + (ROOT / "recipes/longabc_datatrove.py").read_text()
    used = set(re.findall(r"from (datatrove[\w.]*) import (\w+)", source))
    installed = closure(extra("datatrove", "ray"))
    for module, class_name in used:
        step = getattr(__import__(module, fromlist=[class_name]), class_name)
        for dependency in getattr(step, "_requires_dependencies", None) or []:
            dependency = dependency if isinstance(dependency, str) else dependency[1]
            assert name(dependency) in installed, f"datatrove's {class_name} needs {dependency}: add it to the datatrove extra"


def test_dev_installs_every_extra_the_tests_use():
    dev = closure(extra("dev"))
    for extra_name in ("gguf", "plots", "datatrove", "ray"):
        missing = closure(extra(extra_name)) - dev
        assert not missing, f"the dev extra misses what the {extra_name} extra installs: {sorted(missing)}"
