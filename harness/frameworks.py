"""The frameworks, as a registry. What the neutral harness needs to know about a framework is
declared once, by the framework, in `impls/<name>/__init__.py`: `FACTS = FrameworkFacts(...)`.
`registry()` finds the declarations by scanning the `impls` package's subpackages, so a new
framework is a new folder under `impls/` (and its `conf/framework/<name>.yaml`): nothing under
`harness/` names a framework (`tests/test_architecture.py` checks).

A declaration imports no framework: `import impls.<name>` must stay cheap (its callables, the
ISA probe, import the framework when called). This module imports only the standard library;
the `impls.<name>` packages are imported on the first `registry()` call.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: the package whose subpackages declare the frameworks
PACKAGE = "impls"
#: Adam's conventions (`harness.reference.optimizer_step`): "standard" adds eps to the
#: bias-corrected sqrt(v) (torch.optim, optax); "keras" adds it to the uncorrected sqrt(v)
ADAM_CONVENTIONS = ("standard", "keras")


@dataclass(frozen=True)
class JobSettings:
    """What a job's process environment may depend on, set before any framework is imported."""

    device: str = "cpu"  # cpu | gpu | auto
    float64: bool = False  # the job computes (some of) its numbers in float64
    threads: int = 0  # 0: the framework's default
    cache_dir: str | None = None  # an empty folder of the job's own for compile caches (cold compiles)
    inherited: Mapping[str, str] = field(default_factory=dict)  # the environment before any change (a user's setting wins)


@dataclass(frozen=True)
class FrameworkFacts:
    """Everything the harness knows about one framework (declared in `impls/<name>/__init__.py`).

    - `name`: the framework's name in the config (`framework=<name>`), records and tables; the
      subpackage `impls.<name>` (its `backend.BACKEND`) must carry the same name;
    - `modes`: the modes it implements ("eager" runs op by op; the others compile), and
      `compiled`: the one the generic mode "compiled" means;
    - `module`: the Python module to look for (`importlib.util.find_spec`, without importing it)
      to tell whether the framework is installed; `extra`: the pyproject extra that installs it;
    - `order`: its place in tables, plots and `framework=all` (ascending; ties by name);
    - `color`: its colour in plots (a matplotlib colour; None: matplotlib's cycle);
    - `adam_convention`: where its Adam adds eps (`ADAM_CONVENTIONS`);
    - `env_before_import(settings)`: environment variables its job's process needs before the
      framework is imported (memory growth, float64, platforms, compile caches ...);
    - `isa_probe()`: what decides its float32 results on this CPU (the ISA its kernels dispatch
      to, a kernel fingerprint: `harness.fingerprint`), a dict; imports the framework;
    - `compile_cache_note`: set when its compiled mode reuses an in-process compile cache, so
      that later seeds in one job skip compilation: the sentence a table says it in.
    """

    name: str
    modes: tuple[str, ...]
    compiled: str
    module: str = ""  # default: `name`
    extra: str = ""  # default: `name`
    order: int = 100
    color: str | None = None
    adam_convention: str = "standard"
    env_before_import: Callable[[JobSettings], Mapping[str, str]] | None = None
    isa_probe: Callable[[], Mapping[str, Any]] | None = None
    compile_cache_note: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"FrameworkFacts.name: must be a lowercase identifier, got {self.name!r}")
        object.__setattr__(self, "modes", tuple(self.modes))
        object.__setattr__(self, "module", self.module or self.name)
        object.__setattr__(self, "extra", self.extra or self.name)
        if "eager" not in self.modes:
            raise ValueError(f"FrameworkFacts.modes ({self.name}): must include eager, got {list(self.modes)}")
        if "compiled" in self.modes and self.compiled != "compiled":
            raise ValueError(f"FrameworkFacts.compiled ({self.name}): a mode named compiled must be the compiled one")
        if self.compiled not in self.modes or self.compiled == "eager":
            raise ValueError(f"FrameworkFacts.compiled ({self.name}): must be one of its modes other than eager, "
                             f"got {self.compiled!r}")
        if self.adam_convention not in ADAM_CONVENTIONS:
            raise ValueError(f"FrameworkFacts.adam_convention ({self.name}): must be one of "
                             f"{', '.join(ADAM_CONVENTIONS)}, got {self.adam_convention!r}")

    def env(self, settings: JobSettings) -> dict[str, str]:
        """The environment variables its job's process needs (`env_before_import`), as strings."""
        if self.env_before_import is None:
            return {}
        return {str(k): str(v) for k, v in self.env_before_import(settings).items()}


@functools.cache
def registry() -> dict[str, FrameworkFacts]:
    """Every framework declared under `impls/` (a subpackage with `FACTS`), in declared order."""
    package = importlib.import_module(PACKAGE)
    found: list[FrameworkFacts] = []
    for info in pkgutil.iter_modules(package.__path__):
        if not info.ispkg:
            continue
        module = importlib.import_module(f"{PACKAGE}.{info.name}")
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            # a declaration that imports the harness's spec/api before FACTS is set
            raise ImportError(f"{PACKAGE}.{info.name} is being imported while the framework registry is built: "
                              f"its __init__.py may import only harness.frameworks (and no framework)")
        facts = getattr(module, "FACTS", None)
        if facts is None:
            continue
        if not isinstance(facts, FrameworkFacts):
            raise TypeError(f"{PACKAGE}.{info.name}.FACTS must be a harness.frameworks.FrameworkFacts, "
                            f"got {type(facts).__name__}")
        if facts.name != info.name:
            raise ValueError(f"{PACKAGE}.{info.name}.FACTS.name must be {info.name!r} (the package), got {facts.name!r}")
        found.append(facts)
    return {f.name: f for f in sorted(found, key=lambda f: (f.order, f.name))}


def names() -> tuple[str, ...]:
    """The registered frameworks' names, in declared order."""
    return tuple(registry())


def get(name: str) -> FrameworkFacts | None:
    """`name`'s facts; None for a framework not registered (e.g. in an old record)."""
    return registry().get(name)


def facts(name: str) -> FrameworkFacts:
    """`name`'s facts; a ValueError naming the registered frameworks otherwise."""
    f = get(name)
    if f is None:
        raise ValueError(f"unknown framework {name!r}; choose from {', '.join(names())}")
    return f


def rank(name: str) -> int:
    """`name`'s place in the declared order (an unregistered framework comes last)."""
    order = names()
    return order.index(name) if name in order else len(order)
