"""Make lm_eval's own command line know the model class ``bkexp`` (``lm_eval --model bkexp --model_args run=DIR``).

lm_eval 0.4.x finds models only in its registry and has no plugin entry point, so an outside model class must be
registered in the same process before lm_eval looks it up. ``bkexp eval install-lm-eval`` writes a one-line
``.pth`` file into site-packages; Python runs it at start-up and it calls :func:`install`, which costs nothing
until ``lm_eval.api.registry`` is imported: then the import is completed and ``bkexp`` is added as a lazy entry
(``bkexp.eval.harness:BkexpLM``, imported only when ``--model bkexp`` is used). lm_eval's own models are
registered first, because lm_eval fills its registry only when it finds it empty.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Any

REGISTRY = "lm_eval.api.registry"
TARGET = "bkexp.eval.harness:BkexpLM"
PTH_NAME = "bkexp-lm-eval.pth"


def pth_text() -> str:
    """The start-up line: load this file by its path and call :func:`install`.

    By path, not ``import bkexp``: Python reads the user site-packages before the system's, where ``pip install
    -e .`` puts the finder of an editable install, so a ``--user`` file could not import bkexp at start-up. This
    file imports only the standard library; bkexp itself is imported when lm_eval asks for the model."""
    return ("import importlib.util as _u; _s = _u.spec_from_file_location('_bkexp_lm_eval_hook', "
            f"{str(Path(__file__).resolve())!r}); _m = _u.module_from_spec(_s); _s.loader.exec_module(_m); "
            "_m.install()\n")


def register(registry: ModuleType) -> None:
    import lm_eval.models  # noqa: F401  (lm_eval's own models first: it fills only an empty registry)

    if "bkexp" not in registry.model_registry:
        registry.model_registry.register("bkexp", target=TARGET)


class _RegistryFinder(importlib.abc.MetaPathFinder):
    """Finds ``lm_eval.api.registry`` once, with the normal finders, and registers bkexp after it has loaded."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            load(module)
            register(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register bkexp now if lm_eval's registry is loaded, else as soon as it is."""
    if REGISTRY in sys.modules:
        register(sys.modules[REGISTRY])
    elif not any(isinstance(f, _RegistryFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder())


def site_dir(user: bool) -> Path:
    if user:
        import site

        return Path(site.getusersitepackages())
    return Path(sysconfig.get_paths()["purelib"])


def write_pth(user: bool = False, remove: bool = False) -> Path:
    """Write (or remove) the start-up file that runs :func:`install`; returns its path."""
    from bkexp.utils import atomic_write_text

    path = site_dir(user) / PTH_NAME
    if remove:
        path.unlink(missing_ok=True)
    else:
        atomic_write_text(path, pth_text())
    return path
