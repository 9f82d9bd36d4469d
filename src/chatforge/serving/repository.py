"""The model repository: versioned bundles on disk, pins, and the watcher that hot-swaps them.

Layout ``DIR/<name>/<version>/`` (one bundle per version): each name serves its latest version
(natural order, :func:`version_key`) unless pinned (``--pin name=version`` or a ``PINNED`` file).
:class:`ModelDirectoryWatcher` polls the directory and calls :meth:`Engine.swap
<chatforge.serving.engine.Engine.swap>` when the wanted version changes; the engine itself knows
nothing of folders.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from chatforge.inference import ReplyGenerator, TextClassifier, check_precision
from chatforge.serving import backend_ct2
from chatforge.serving.engine import Engine, bundle_serving_task, load_hosted_model, model_task

logger = logging.getLogger(__name__)

_VERSION_PART = re.compile(r"(\d+)")


def version_key(version: str) -> tuple:
    """Natural order: "2" < "10", "v1.9" < "v1.10"; numbers sort before text at the same place."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in _VERSION_PART.split(version) if p)


class ModelDirectory:
    """``root/<name>/<version>/`` bundles: each name serves its latest version unless pinned.

    A pin comes from ``pins`` (e.g. ``--pin chat=3``) or a file ``root/<name>/PINNED`` holding a
    version; rolling back is pinning the previous version. Folders whose names start with "."
    (bundles being written) are ignored, and so is ``lost+found`` at the root: a volume formatted ext2/3/4
    (a block-device PersistentVolume, a Filestore share, a disk mounted on the host) has one, owned by root
    with mode 0700, which a non-root server cannot list, and fsck puts recovered folders in it.
    """

    PIN_FILE = "PINNED"
    IGNORED_NAMES = frozenset({"lost+found"})

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

    def scan(self) -> tuple[dict[str, tuple[str, Path]], dict[str, Exception]]:
        """What each model should serve now, and what keeps the others from resolving.

        Returns ``(wanted, problems)``: name -> (version, bundle folder), and name -> the error
        for a model that cannot be resolved (pinned to a version that does not exist, an
        unreadable ``PINNED`` file or folder). One model's problem is its own: the others
        still resolve. Only an unreadable root raises.
        """
        wanted: dict[str, tuple[str, Path]] = {}
        problems: dict[str, Exception] = {}
        for d in sorted(p for p in self.root.iterdir()
                        if p.is_dir() and not p.name.startswith(".") and p.name not in self.IGNORED_NAMES):
            try:
                versions = self.versions(d.name)
                if not versions:
                    continue
                version = self.pinned(d.name) or versions[-1]
                if version not in versions:
                    raise FileNotFoundError(
                        f"model {d.name!r} is pinned to version {version!r}, which does not exist; "
                        f"available: {', '.join(versions)}"
                    )
            except PermissionError as e:  # a folder (or PINNED) made by root, 0700: say which, and the fix
                problems[d.name] = self._permission_denied(e, d)
                continue
            except (OSError, ValueError) as e:  # ValueError: a PINNED file that is not UTF-8
                problems[d.name] = e
                continue
            wanted[d.name] = (version, d / version)
        return wanted, problems

    def _permission_denied(self, e: PermissionError, default: Path) -> ValueError:
        """The one-line error for a folder or file under the root this process may not read (a configuration
        error, logged without a traceback), in the words an unreadable bundle file gets."""
        path = Path(e.filename) if e.filename else default
        try:
            st = os.stat(path)
            mode = f" (mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid})"
        except OSError:
            mode = ""
        return ValueError(f"permission denied: cannot read {path}{mode}; this process runs as uid {os.geteuid()}. "
                          f"Make the model directory readable by it, e.g. chmod -R a+rX {self.root}")

    def resolve(self) -> dict[str, tuple[str, Path]]:
        """name -> (version, bundle folder) that should be served now; raises on any model's problem
        (at startup every model must resolve; the watcher uses :meth:`scan` instead)."""
        wanted, problems = self.scan()
        for e in problems.values():
            raise e
        for option, names in (("--pin", self.pins), ("--backend", self.backends)):
            unknown = sorted(set(names) - set(wanted))
            if unknown:  # a typo (--pin chatt=2, --backend chatt=ctranslate2) must not pass for what it asked
                raise ValueError(f"{option} names no model under {self.root}: {', '.join(unknown)}; "
                                 f"models: {', '.join(sorted(wanted)) or 'none'}")
        if not wanted:
            raise FileNotFoundError(f"no bundles under {self.root}; expected {self.root}/<name>/<version>/")
        return wanted

    def name_task(self, name: str) -> tuple[str, str] | None:
        """(task, version) of the oldest version of ``name`` whose ``metadata.json`` names a task: the task the
        name was first published with, which every later version must keep (None when no version says)."""
        for version in self.versions(name):
            task = bundle_serving_task(self.root / name / version)
            if task is not None:
                return task, version
        return None

    def check_task(self, name: str, version: str, path: Path) -> None:
        """Refuse, from metadata alone, a version whose task differs from the name's first version: a replica
        that starts now must serve what the running ones serve (their watcher refuses such a version)."""
        task, first = bundle_serving_task(path), self.name_task(name)
        if task is not None and first is not None and task != first[0]:
            raise ValueError(f"model {name!r} serves {first[0]} (version {first[1]}); version {version} ({path}) is a "
                             f"{task} bundle, and a name keeps its task across versions (not loaded); remove or "
                             f"pin around version {version}")

    def load_engine(self, loader: Callable[..., Any] | None = None, **engine_kwargs) -> Engine:
        hosted: dict[str, dict[str, Any]] = {"generation": {}, "classification": {}, "selection": {}}
        for name, (version, path) in self.resolve().items():
            self.check_task(name, version, path)
            model = (loader or self.load)(path, name, version)
            hosted[model_task(model)][name] = model
        if hosted["selection"]:
            engine_kwargs["retrievers"] = {**hosted["selection"], **engine_kwargs.get("retrievers", {})}
        return Engine(hosted["generation"], hosted["classification"], **engine_kwargs)


Fingerprint = tuple[tuple[str, int, int, int, int, int], ...]


def folder_fingerprint(path: Path) -> Fingerprint:
    """(relative name, size, mtime in ns, mode, uid, gid) of everything under ``path``, sorted: it changes
    when a file is added, removed, rewritten or touched, and when its permissions or owner change (the fix
    for a version that failed with "permission denied" is a chmod or chown, which leaves size and mtime
    alone). Entries that vanish while it is taken are left out; a folder that cannot be read gives what
    could be read (an empty tuple at worst)."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(path):
        for entry in (*dirnames, *filenames):
            full = os.path.join(dirpath, entry)
            try:
                st = os.stat(full)
            except OSError:
                continue
            entries.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid,
                            st.st_gid))
    return tuple(sorted(entries))


class ModelDirectoryWatcher:
    """Polls a :class:`ModelDirectory` and hot-swaps models whose served version changed.

    Loading happens on the watcher's thread, beside the serving version; a version that fails
    to load, or that the engine refuses (e.g. a classifier under a generator's name), is logged
    once, reported (``on_load_error``) and the old one keeps serving. A version whose bundle says
    (``metadata.json``) it serves another task than the name does is refused before its weights are
    read. A failed version is tried again when its folder changes (:func:`folder_fingerprint`: a
    half-copied bundle is retried once the copy completes), never on every poll. A model that cannot
    be resolved (a bad pin) is logged and reported (``on_problem``) once per distinct problem and
    holds back only itself. Nothing one version does stops the watcher; should its thread end any
    other way than :meth:`stop`, ``on_stopped`` is called with the reason (the server then fails
    its liveness check, so the orchestrator restarts a replica that no longer follows the folder).
    A poll still running after ``stall_timeout`` seconds (a read that never returns: a hung NFS hard
    mount, a FIFO where a weights file should be) leaves the replica just as deaf to the folder, so it
    is reported the same way, with a :class:`TimeoutError` as the reason.
    """

    STALL_TIMEOUT = 900.0  # seconds; a legitimate load of a large bundle from slow storage stays well below

    def __init__(self, engine: Engine, directory: ModelDirectory, *, poll_interval: float = 5.0,
                 loader: Callable[..., Any] | None = None,
                 on_load_error: Callable[[str, BaseException], None] | None = None,
                 on_problem: Callable[[str, str], None] | None = None,
                 on_stopped: Callable[[BaseException | None], None] | None = None,
                 stall_timeout: float | None = STALL_TIMEOUT) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval={poll_interval!r} is out of range; allowed: seconds > 0")
        if stall_timeout is not None and stall_timeout <= 0:
            raise ValueError(f"stall_timeout={stall_timeout!r} is out of range; allowed: seconds > 0, or None")
        self.stall_timeout = stall_timeout
        self._stopped_reported = threading.Lock()  # on_stopped is called at most once
        self.engine, self.directory, self.poll_interval = engine, directory, poll_interval
        self.loader, self.on_load_error = loader or directory.load, on_load_error
        self.on_problem, self.on_stopped = on_problem, on_stopped
        self.swaps = 0
        # (name, version) -> fingerprint of its folder taken before the failed attempt; retried when it differs
        self._failed: dict[tuple[str, str], Fingerprint] = {}
        # (name, version) -> the error its last failed attempt gave: the same error again (a copy still under
        # way fails the same way on every poll that sees its folder grow) is not logged or alerted again
        self._failed_error: dict[tuple[str, str], str] = {}
        # model name ("" for the directory itself) -> the problem last logged for it
        self._problems: dict[str, str] = {}
        # names this watcher saw in the directory (at startup, or resolved by a scan since)
        try:
            self._seen = {m.name for m in engine.models() if (directory.root / m.name).is_dir()}
        except OSError:
            self._seen = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_once(self) -> list[str]:
        """Swap every model whose wanted version differs from the served one; return their names."""
        swapped: list[str] = []
        try:
            wanted, problems = self.directory.scan()
        except Exception as e:  # noqa: BLE001 - an unreadable root: keep serving, poll again
            self._note_problems({"": f"model directory scan failed: {e}"})
            return swapped
        notes = {name: f"model directory scan: {e}; keeping the served version" for name, e in problems.items()}
        if not wanted and not problems:
            notes[""] = f"model directory scan: no bundles under {self.directory.root}; keeping the served versions"
        self._seen |= wanted.keys()
        for name in sorted(self._seen - wanted.keys() - problems.keys()):
            served = self.engine.version_of(name)
            if served is not None:  # its folder, or every version in it, was removed
                notes[name] = (f"model directory scan: model {name!r} has no version under {self.directory.root}; "
                               f"keeping the served version {served} (a replica started now would not serve "
                               f"{name!r})")
        self._note_problems(notes)
        # Forget failures of versions no longer wanted by a model that resolved (bounds the memory)
        self._failed = {k: fp for k, fp in self._failed.items() if k[0] not in wanted or wanted[k[0]][0] == k[1]}
        self._failed_error = {k: e for k, e in self._failed_error.items() if k in self._failed}
        for name, (version, path) in wanted.items():
            if self.engine.version_of(name) == version:
                continue
            # Taken before loading: a file that lands while the load runs makes the next poll retry
            fingerprint = folder_fingerprint(path)
            if self._failed.get((name, version)) == fingerprint:
                continue  # failed before, and nothing changed since
            if self._load_and_swap(name, version, path, fingerprint):
                swapped.append(name)
        return swapped

    @property
    def alive(self) -> bool:
        """True while the polling thread runs (False before :meth:`start` and after it ended)."""
        return self._thread is not None and self._thread.is_alive()

    def _load_and_swap(self, name: str, version: str, path: Path, fingerprint: Fingerprint) -> bool:
        model = None
        try:
            served, task = self.engine.task_of(name), bundle_serving_task(path)
            if served is not None and task is not None and task != served:
                # Refused from its metadata: a wrong-task bundle (a large generator under a classifier's name)
                # is never loaded next to the serving version.
                raise ValueError(f"model {name!r} serves {served}; version {version} ({path}) is a {task} bundle, "
                                 "and a name keeps its task across versions (not loaded)")
            model = self.loader(path, name, version)
            self.engine.swap(name, model)
        except Exception as e:  # noqa: BLE001 - any failure of one version: keep serving the old one
            self._failed[(name, version)] = fingerprint
            if model is not None and self.engine.version_of(name) != version:
                _close_quietly(model)  # loaded but refused: release what it holds (CTranslate2 pools)
            what = "loading" if model is None else "swapping in"
            error = f"{type(e).__name__}: {e}"
            if self._failed_error.get((name, version)) == error:
                logger.info("%s %s version %s failed again, the same way, after its folder changed (a copy under "
                            "way?); keeping the served version %s", what, name, version, self.engine.version_of(name),
                            extra={"model": name, "version": version, "served": self.engine.version_of(name)})
                return False
            self._failed_error[(name, version)] = error
            logger.error("%s %s version %s failed: %s; keeping the served version %s", what, name, version, e,
                         self.engine.version_of(name), exc_info=True,
                         extra={"model": name, "version": version, "served": self.engine.version_of(name)})
            if self.on_load_error is not None:
                try:
                    self.on_load_error(name, e)
                except Exception:  # noqa: BLE001 - a broken alert sink must not stop the watcher
                    logger.exception("reporting the failure of %s version %s failed", name, version)
            return False
        self._failed.pop((name, version), None)
        self._failed_error.pop((name, version), None)
        self.swaps += 1
        return True

    def _note_problems(self, problems: dict[str, str]) -> None:
        """Log each problem once while it lasts; a changed or returning problem is logged again."""
        for key, message in problems.items():
            if self._problems.get(key) != message:
                logger.warning("%s", message, extra={"model": key} if key else {})
                if self.on_problem is not None:
                    try:
                        self.on_problem(key, message)
                    except Exception:  # noqa: BLE001 - a broken alert sink must not stop the watcher
                        logger.exception("reporting the model directory problem of %r failed", key)
        for key in self._problems.keys() - problems.keys():
            logger.info("model directory scan: the problem with %s is gone", repr(key) if key else "the directory",
                        extra={"model": key} if key else {})
        self._problems = dict(problems)

    def _report_stopped(self, reason: BaseException | None) -> None:
        if self._stop.is_set() or not self._stopped_reported.acquire(blocking=False):
            return
        logger.critical("the model directory watcher stopped (%r); %s no longer follows %s",
                        reason, "this server", self.directory.root)
        if self.on_stopped is not None:
            try:
                self.on_stopped(reason)
            except Exception:  # noqa: BLE001
                logger.exception("reporting the watcher's stop failed")

    def _stalled(self) -> None:
        self._report_stopped(TimeoutError(
            f"a model directory poll has been running for more than {self.stall_timeout:g} s "
            "(a read that does not return, e.g. a hung network mount)"))

    def start(self) -> ModelDirectoryWatcher:
        def run() -> None:
            reason: BaseException | None = None
            try:
                while not self._stop.wait(self.poll_interval):
                    timer = None
                    if self.stall_timeout is not None:
                        timer = threading.Timer(self.stall_timeout, self._stalled)
                        timer.daemon = True
                        timer.start()
                    try:
                        self.check_once()
                    except Exception:  # noqa: BLE001 - the watcher outlives any one poll
                        logger.exception("model directory poll failed; the watcher keeps polling")
                    finally:
                        if timer is not None:
                            timer.cancel()
            except BaseException as e:  # SystemExit, KeyboardInterrupt or the like from a loader: reported, then raised
                reason = e
                raise
            finally:
                self._report_stopped(reason)

        self._thread = threading.Thread(target=run, name="chatforge-model-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_interval + 5)


def _close_quietly(model: Any) -> None:
    close = getattr(model, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # noqa: BLE001 - best effort; the failure itself is already being reported
            logger.debug("closing a refused model failed", exc_info=True)
