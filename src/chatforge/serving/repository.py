"""The model repository: versioned bundles on disk, pins, and the watcher that hot-swaps them.

Layout ``DIR/<name>/<version>/`` (one bundle per version): each name serves its latest version
(natural order, :func:`version_key`) unless pinned (``--pin name=version`` or a ``PINNED`` file).
:class:`ModelDirectoryWatcher` polls the directory and calls :meth:`Engine.swap
<chatforge.serving.engine.Engine.swap>` when the wanted version changes; the engine itself knows
nothing of folders.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from chatforge.inference import ReplyGenerator, TextClassifier, check_precision
from chatforge.serving import backend_ct2
from chatforge.serving.engine import Engine, load_hosted_model

logger = logging.getLogger(__name__)

_VERSION_PART = re.compile(r"(\d+)")


def version_key(version: str) -> tuple:
    """Natural order: "2" < "10", "v1.9" < "v1.10"; numbers sort before text at the same place."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in _VERSION_PART.split(version) if p)


class ModelDirectory:
    """``root/<name>/<version>/`` bundles: each name serves its latest version unless pinned.

    A pin comes from ``pins`` (e.g. ``--pin chat=3``) or a file ``root/<name>/PINNED`` holding a
    version; rolling back is pinning the previous version. Folders whose names start with "."
    (bundles being written) are ignored.
    """

    PIN_FILE = "PINNED"

    def __init__(self, root: str | Path, pins: Mapping[str, str] | None = None, precision: str = "fp32",
                 backend: str = "torch", backends: Mapping[str, str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"model directory not found: {self.root} is not a folder")
        self.pins = dict(pins or {})
        self.precision = check_precision(precision)
        self.backend = backend_ct2.check_backend(backend)
        self.backends = {n: backend_ct2.check_backend(b) for n, b in (backends or {}).items()}

    def load(self, path: Path, name: str, version: str) -> ReplyGenerator | TextClassifier:
        """Load one version at this directory's serving precision and backend (every version alike)."""
        return load_hosted_model(path, name, version, self.precision, self.backends.get(name, self.backend))

    def versions(self, name: str) -> list[str]:
        d = self.root / name
        return sorted((p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")), key=version_key)

    def pinned(self, name: str) -> str | None:
        if name in self.pins:
            return self.pins[name]
        pin = self.root / name / self.PIN_FILE
        if pin.is_file():
            return pin.read_text(encoding="utf-8").strip() or None
        return None

    def resolve(self) -> dict[str, tuple[str, Path]]:
        """name -> (version, bundle folder) that should be served now."""
        out: dict[str, tuple[str, Path]] = {}
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            versions = self.versions(d.name)
            if not versions:
                continue
            version = self.pinned(d.name) or versions[-1]
            if version not in versions:
                raise FileNotFoundError(
                    f"model {d.name!r} is pinned to version {version!r}, which does not exist; "
                    f"available: {', '.join(versions)}"
                )
            out[d.name] = (version, d / version)
        if not out:
            raise FileNotFoundError(f"no bundles under {self.root}; expected {self.root}/<name>/<version>/")
        return out

    def load_engine(self, loader: Callable[..., Any] | None = None, **engine_kwargs) -> Engine:
        generators, classifiers = {}, {}
        for name, (version, path) in self.resolve().items():
            model = (loader or self.load)(path, name, version)
            (generators if hasattr(model, "stream") else classifiers)[name] = model
        return Engine(generators, classifiers, **engine_kwargs)


class ModelDirectoryWatcher:
    """Polls a :class:`ModelDirectory` and hot-swaps models whose served version changed.

    Loading happens on the watcher's thread, beside the serving version; a version that
    fails to load is reported (``on_load_error``) and the old one keeps serving.
    """

    def __init__(self, engine: Engine, directory: ModelDirectory, *, poll_interval: float = 5.0,
                 loader: Callable[..., Any] | None = None,
                 on_load_error: Callable[[str, BaseException], None] | None = None) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval={poll_interval!r} is out of range; allowed: seconds > 0")
        self.engine, self.directory, self.poll_interval = engine, directory, poll_interval
        self.loader, self.on_load_error = loader or directory.load, on_load_error
        self.swaps = 0
        self._failed: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_once(self) -> list[str]:
        """Swap every model whose wanted version differs from the served one; return their names."""
        swapped = []
        try:
            wanted = self.directory.resolve()
        except (OSError, ValueError) as e:
            logger.warning("model directory scan failed: %s", e)
            return swapped
        for name, (version, path) in wanted.items():
            if self.engine.version_of(name) == version or (name, version) in self._failed:
                continue
            try:
                model = self.loader(path, name, version)
            except Exception as e:  # noqa: BLE001 - keep serving the old version
                self._failed.add((name, version))
                logger.error("loading %s version %s failed; keeping the served version", name, version,
                             exc_info=True)
                if self.on_load_error is not None:
                    self.on_load_error(name, e)
                continue
            self.engine.swap(name, model)
            self.swaps += 1
            swapped.append(name)
        return swapped

    def start(self) -> ModelDirectoryWatcher:
        def run() -> None:
            while not self._stop.wait(self.poll_interval):
                self.check_once()

        self._thread = threading.Thread(target=run, name="chatforge-model-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_interval + 5)
