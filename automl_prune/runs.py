"""Run directories: the resolved config, an append-only evaluation log, the best plan.

A search run writes into its directory:

- ``config.yaml``: the resolved config the run was started with (written atomically; a
  run is reproduced with ``automl-prune search --config DIR/config.yaml``);
- ``evaluations.jsonl``: one JSON line per evaluation (index, plan, evaluation, strategy,
  time), appended and flushed as each finishes, so an interrupted run loses nothing it
  finished;
- ``plan.json`` and ``result.json`` when the search completes.

Resuming (``automl-prune search --resume DIR``) rebuilds the evaluator from ``config.yaml``,
preloads its cache with the logged evaluations and runs the same strategy with the same
seed: every strategy is seed-deterministic, so it re-proposes the logged plans, which are
served from the cache, and continues from where the run stopped without repeating a
finished evaluation.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from automl_prune.errors import InvalidValueError
from automl_prune.io import write_text
from automl_prune.types import Evaluation, Plan

if TYPE_CHECKING:
    from automl_prune.parallel import Placement

logger = logging.getLogger(__name__)

CONFIG = "config.yaml"
LOG = "evaluations.jsonl"
LOCK = ".lock"
_HELD: dict[Path, int] = {}
"""Run directories this process holds the lock of: path -> open descriptor (kept until exit)."""


def lock_run_dir(path: Path) -> None:
    """Take the exclusive lock of a run directory for this process (one writer per directory).

    The lock is an ``flock`` on ``DIR/.lock``, which also records the holder's PID and host; the
    kernel releases it when the holder exits, however it exits, so a lock left by a dead process is
    never in the way. Re-entrant within a process.

    Raises:
        InvalidValueError: Another live process holds it (naming its PID and host).
    """
    import fcntl
    import socket

    key = path.resolve()
    if key in _HELD:
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise InvalidValueError(
            f"'{path}' is in use by another automl-prune process ({holder}); wait for it to finish, "
            "or choose another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    _HELD[key] = fd


RESUME_OPTIONS = (
    "parallel.cpus_per_worker",
    "parallel.gpus_per_worker",
    "parallel.ray_address",
    "parallel.task_timeout",
    "parallel.worker_timeout",
)
"""Where a run's evaluations compute, which ``--resume`` may change: the results do not depend on them
(``parallel.workers`` is not among them: batched strategies ask for that many plans at a time)."""

PRELUDE = ("baseline.pt", "latency_model.json")
"""What the main job writes before its first evaluation: copies of what the cache holds, not results."""

COMPLETE = ("plan.json", "result.json", "model.pt", "model.ts", "model.onnx", "report.json", "report.md")
"""The files a finished main job leaves (the report is written last)."""

OUTPUTS = (
    LOG,
    "plan.json",
    "result.json",
    "baseline.pt",
    "model.pt",
    "model.ts",
    "model.onnx",
    "baseline.ts",
    "baseline.onnx",
    "latency_model.json",
    "finalists.json",
    "pareto.json",
    "pareto.png",
    "refine.json",
    "refine.png",
    "refine",
    "export.json",
    "policy.pt",
    "report.json",
    "report.md",
    "keep_ratios.png",
    "search_curve.png",
    "comparison.md",
    "comparison.csv",
    "best_so_far.png",
    "accuracy_vs_flops.png",
    "accuracy_vs_latency.png",
    "trials",
)
"""Files a run (search or comparison) writes; a run started afresh in a directory removes the previous run's."""


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise InvalidValueError(f"'{path}' is not valid YAML ({first}); the run directory is damaged") from None
    if not isinstance(data, dict):
        raise InvalidValueError(f"'{path}' does not hold a config; the run directory is damaged")
    return data


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested config."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class RunDirectory:
    """One search run's directory.

    Args:
        path: The directory.
        config: The run's resolved options (JSON-ready).
        resume: Continue the run already in ``path`` (its config must exist).
        overwrite: Start afresh even if ``path`` holds a different run.
        resumable: Whether the run can be resumed (only changes what the refusal suggests).

    Raises:
        InvalidValueError: ``resume`` on a directory that is not a run, or ``path`` holding a
            run with a different config (without ``overwrite``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: dict[str, Any] | None = None,
        resume: bool = False,
        overwrite: bool = False,
        resumable: bool = True,
    ):
        self.path = Path(path)
        config_path = self.path / CONFIG
        if self.path.is_dir() or not resume:
            if self.path.exists() and not self.path.is_dir():
                raise InvalidValueError(f"'{self.path}' exists and is not a directory; choose another --out")
            lock_run_dir(self.path)
        if resume:
            if not config_path.is_file():
                raise InvalidValueError(
                    f"'{self.path}' is not a run directory (no {CONFIG}); give the directory a search wrote into"
                )
            self.config = _read_config(config_path)
        else:
            if config is None:
                raise InvalidValueError("a new run needs its config")
            if config_path.is_file() and not overwrite and not self._holds_results():
                overwrite = True  # a run that failed before its first evaluation: nothing to lose
            if config_path.is_file() and not overwrite:
                existing, new = _flat(_read_config(config_path)), _flat(config)
                if existing != new:
                    changed = sorted(k for k in set(existing) | set(new) if existing.get(k) != new.get(k))
                    raise InvalidValueError(
                        f"'{self.path}' holds a different run (options differ: {', '.join(changed)}); "
                        + (
                            "use --resume to continue it, another --out, or --overwrite"
                            if resumable
                            else "use another --out, or --overwrite"
                        )
                    )
            if not config_path.is_file() and not overwrite and self.path.is_dir():
                stray = [name for name in OUTPUTS if (self.path / name).exists()]
                if stray:
                    raise InvalidValueError(
                        f"'{self.path}' holds {', '.join(stray)} but no run config; choose another --out "
                        "or pass --overwrite to replace them"
                    )
            if self.path.exists() and not self.path.is_dir():
                raise InvalidValueError(f"'{self.path}' exists and is not a directory; choose another --out")
            self.path.mkdir(parents=True, exist_ok=True)
            if overwrite or not config_path.is_file():
                for name in OUTPUTS:
                    target = self.path / name
                    if target.is_dir():
                        shutil.rmtree(target)
                    else:
                        target.unlink(missing_ok=True)
            write_text(config_path, yaml.safe_dump(config, sort_keys=False))
            self.config = config
        self.records = self._read_log(repair=True)

    def amend(self, config: dict[str, Any]) -> None:
        """Replace the stored config (atomically) with ``config``, which may differ only in :data:`RESUME_OPTIONS`.

        Raises:
            InvalidValueError: ``config`` changes anything else.
        """
        old, new = _flat(self.config), _flat(config)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUME_OPTIONS)
        if changed:
            raise InvalidValueError(f"a resumed run keeps its config; these options would change: {', '.join(changed)}")
        write_text(self.path / CONFIG, yaml.safe_dump(config, sort_keys=False))
        self.config = config

    def _read_log(self, repair: bool = False) -> list[dict[str, Any]]:
        """The log's records; a torn last line (a run killed mid-write) is ignored, and cut off if ``repair``."""
        log = self.path / LOG
        if not log.is_file():
            return []
        records = []
        good = 0  # bytes up to the end of the last complete record
        data = log.read_bytes()
        for number, line in enumerate(data.splitlines(keepends=True), 1):
            if not line.strip():
                good += len(line)
                continue
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("no newline")
                records.append(json.loads(line))
            except ValueError:
                logger.warning("ignoring a torn line %d at the end of %s", number, log)
                if repair:  # so that appended records start on a line of their own
                    os.truncate(log, good)
                break
            good += len(line)
        return records

    def _holds_results(self) -> bool:
        """Whether the directory holds any evaluation or output of a run.

        The files a run writes before its first evaluation (:data:`PRELUDE`: the copied baseline,
        the latency model, both kept in the cache as well) are not results: a run that stopped
        there (an unreachable budget, a device that is not there) is replaced by the corrected command.
        """
        return bool(self._read_log()) or any(
            (self.path / name).exists() for name in OUTPUTS if name != LOG and name not in PRELUDE
        )

    def complete(self) -> bool:
        """Whether every stage of the main job has finished here (the report and the exported model are written)."""
        return all((self.path / name).is_file() for name in COMPLETE)

    def logged(self) -> list[tuple[Plan, Evaluation]]:
        """The (plan, evaluation) pairs in the log, as it is on disk now."""
        return [(Plan.from_dict(r["plan"]), Evaluation(**r["evaluation"])) for r in self._read_log()]

    def callback(self, strategy: str, placements: list[Placement] | None = None) -> Any:
        """A search callback that appends every *new* evaluation to the log and flushes it.

        Args:
            strategy: Recorded with each evaluation.
            placements: A :class:`~automl_prune.parallel.Placement` per evaluation in the order
                made (parallel runs); recorded as ``worker``, ``node`` and ``attempts``.
        """
        already = len(self.records)
        handle = (self.path / LOG).open("a")

        def append(session: Any, plan: Plan, evaluation: Evaluation) -> None:
            index = session.used
            if index <= already:
                return  # replayed from the log on resume
            record = {"index": index, "strategy": strategy, "time": time.time()}
            if placements is not None and len(placements) >= index:
                placed = placements[index - 1]
                record.update(worker=placed.worker, node=placed.node, attempts=placed.attempts)
            record.update(plan=plan.to_dict(), evaluation=evaluation.to_dict())
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

        append.close = handle.close  # type: ignore[attr-defined]
        return append
