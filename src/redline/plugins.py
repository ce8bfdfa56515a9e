"""How a name in a config becomes the user's object: `package.module:Attr` or `file.py:Attr`.

Tasks (`task: my_task.py:MyTask`) and telemetry sinks (`trackers: [pkg.sinks:MySink]`) are
both found this way, and installed packages may register names through an entry-point
group (`redline.tasks`, `redline.sinks`).

Two rules keep errors honest:

- A spec that names nothing (no such file, module or attribute) is bad input and raises the
  caller's error type, one sentence. An exception raised *while the user's module runs*
  (a typo in it, an import it makes of a package that is not installed) is the user's bug
  and propagates with its traceback.
- A file is imported under its own name (`my_task.py` as module `my_task`) with its folder
  on `sys.path`, so that classes defined in it can be pickled and found again in other
  processes: DataLoader workers started with spawn or forkserver (macOS's default, and
  Linux's from Python 3.14) receive the parent's `sys.path` and import the module by name.
  A file whose name would hide another importable module is refused with the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from redline.errors import UserError


def entry_point_targets(group: str) -> dict[str, str]:
    """Names that installed packages register in `group`, with their `module:attr` target."""
    return {ep.name: ep.value for ep in entry_points(group=group)}


def load_target(target: str, spec: str, error: type[UserError], what: str) -> Any:
    """The object `target` ("package.module:Attr" or "path/file.py:Attr") names.

    `spec` is what the user wrote (a short name may map to `target`); errors quote it as
    "{what} {spec!r}: ..." and are raised as `error`.
    """
    module_part, _, attr = target.rpartition(":")
    if not module_part or not attr:
        raise error(f"{what} {spec!r} must look like 'package.module:Class' or "
                    "'path/to/file.py:Class'")
    module = (import_file(Path(module_part), spec, error, what) if module_part.endswith(".py")
              else _import_module(module_part, spec, error, what))
    try:
        return getattr(module, attr)
    except AttributeError:
        raise error(f"{what} {spec!r}: module {module_part!r} has no attribute "
                    f"{attr!r}") from None


def _import_module(name: str, spec: str, error: type[UserError], what: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        # Only a missing *target* is bad input; a module missing inside the user's code is
        # their bug, with its traceback.
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise error(f"{what} {spec!r}: cannot import module {name!r} ({e})") from None
        raise


def import_file(path: Path, spec: str, error: type[UserError], what: str) -> Any:
    """Import a .py file as the module named after it, importable in child processes too."""
    if not path.is_file():
        raise error(f"{what} {spec!r}: file {str(path)!r} does not exist")
    path = path.resolve()
    name = path.stem
    if not name.isidentifier():
        raise error(f"{what} {spec!r}: {path.name!r} is not a valid module name; rename the "
                    "file to letters, digits and underscores")
    loaded = sys.modules.get(name)
    if loaded is not None:
        if _origin(loaded) == path:
            return loaded
        raise error(f"{what} {spec!r}: a module named {name!r} is already imported from "
                    f"{_origin(loaded) or 'elsewhere'}; rename {path.name}")
    found = importlib.util.find_spec(name)
    if found is not None and found.origin and Path(found.origin).resolve() != path:
        raise error(f"{what} {spec!r}: {path.name} would hide the module {name!r} "
                    f"({found.origin}); rename the file")
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # so `import name` finds it here and in child processes
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # a failed import leaves nothing half-made behind
        raise
    return module


def _origin(module: Any) -> Path | None:
    file = getattr(module, "__file__", None)
    return Path(file).resolve() if file else None
