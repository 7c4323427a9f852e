"""The run directory: the only code that reads or writes a run's files.

    <run>/config.json     the full config of the run (written when training starts)
    <run>/metrics.jsonl   one JSON record per logged step, with its `step`
    <run>/summary.json    written when training completes; evaluation and the
                          sweep merge their fields into it
    <run>/eval.json       the run's evaluation (before/after metrics, forgetting)

Every JSON file is written to a temporary file in the same directory and
renamed over the old one (`os.replace` is atomic on POSIX), so a killed
process leaves either the old file or the new one, never half of one: a run
whose summary says "completed" is one whose training completed.
`metrics.jsonl` is appended to; a line cut short by a kill is skipped when
read and dropped by `truncate_metrics_after`, which a resumed run calls with
its checkpoint's step so that the steps it replays are logged once.

>>> run = RunDir("runs/one")
>>> run.is_finished()
False
>>> run.write_summary({"status": "completed", "steps": 100})
>>> run.update_summary({"final/target/exact_match": 0.5})
{'status': 'completed', 'steps': 100, 'final/target/exact_match': 0.5}
>>> run.is_finished()
True
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

from ftjax.errors import RunDirError

CONFIG = "config.json"
SUMMARY = "summary.json"
EVAL = "eval.json"
METRICS = "metrics.jsonl"
COMPLETED = "completed"
# Summary field set by the run's evaluation in the same write as its metrics.
EVALUATED = "evaluated"


def json_default(x):
    """JSON for what json cannot encode itself: numpy / JAX scalars and
    arrays become Python numbers and lists; anything else its str()."""
    if hasattr(x, "tolist"):  # numpy and JAX arrays and scalars
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def make_dirs(path: str, what: str = "") -> str:
    """Creates directory `path` (and its parents), or raises a RunDirError
    naming it (`what`, e.g. "--out", prefixes the path) and why it cannot be."""
    where = f"{what}={path}" if what else path
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(f"{where}: is a file; expected a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise RunDirError(
            f"{where}: cannot create it ({e.strerror or e}); expected a writable path"
        ) from None
    return path


def write_text_atomic(path: str, text: str) -> None:
    """`text` at `path`: written to a temporary file beside it, flushed to
    disk, then renamed over `path`; readers see the old file or the new one.
    A path that cannot be written is a RunDirError naming it."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise RunDirError(f"{path}: cannot write it ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):  # the write failed: leave no stray file
            os.remove(tmp)


def write_json_atomic(path: str, data, indent: int | None = 2) -> None:
    """`data` as JSON at `path`, atomically (see `write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=True, default=json_default))


def read_json(path: str):
    """The JSON value at `path`; a RunDirError naming the file if it is not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise RunDirError(f"{path}: not valid JSON ({e}); delete it to rewrite it") from None


class RunDir:
    """One run's directory. Creating the object touches nothing on disk; the
    first write creates the directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def has(self, name: str) -> bool:
        return os.path.isfile(self.file(name))

    def _makedirs(self) -> None:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunDirError(f"{self.path}: is a file; expected a run directory")
        make_dirs(self.path)

    # ------------------------------------------------------------------------- JSON files

    def write_json(self, name: str, data, indent: int | None = 2) -> None:
        """Any of the run's JSON files (also auxiliary ones: weight_analysis.json,
        harness.json), atomically."""
        self._makedirs()
        write_json_atomic(self.file(name), data, indent)

    def read_json(self, name: str, default=None):
        """The run's JSON file `name`, or `default` when it does not exist."""
        if not self.has(name):
            return default
        return read_json(self.file(name))

    def write_config(self, cfg) -> None:
        """config.json from an `ml_collections.ConfigDict` (or a plain dict)."""
        self._makedirs()
        if hasattr(cfg, "to_json_best_effort"):
            write_text_atomic(self.file(CONFIG), cfg.to_json_best_effort(indent=2, sort_keys=True))
        else:
            write_json_atomic(self.file(CONFIG), dict(cfg))

    def read_config(self):
        """config.json as an `ml_collections.ConfigDict`."""
        import ml_collections

        if not os.path.isdir(self.path):
            raise RunDirError(f"{self.path}: not a directory; expected a run directory")
        if not self.has(CONFIG):
            raise RunDirError(f"{self.file(CONFIG)}: no run config (is this a run directory?)")
        return ml_collections.ConfigDict(read_json(self.file(CONFIG)))

    def read_config_dict(self) -> dict:
        """config.json as a plain dict ({} when the run has none)."""
        return self.read_json(CONFIG, {})

    def read_summary(self) -> dict:
        """summary.json; {} while the run has not written one."""
        return self.read_json(SUMMARY, {})

    def write_summary(self, summary: Mapping) -> None:
        """Replaces summary.json with `summary`."""
        self.write_json(SUMMARY, dict(summary))

    def update_summary(self, fields: Mapping | None = None, /, **more) -> dict:
        """Merges `fields` (and keyword fields) into summary.json; returns the
        merged summary. Keys with a '/' go in the mapping:
        `run.update_summary({"final/target/loss": 1.2}, role="prerequisite")`."""
        summary = {**self.read_summary(), **(fields or {}), **more}
        self.write_summary(summary)
        return summary

    def write_eval(self, metrics: Mapping) -> None:
        self.write_json(EVAL, dict(metrics))

    def read_eval(self) -> dict:
        """eval.json; {} while the run has not been evaluated."""
        return self.read_json(EVAL, {})

    # ------------------------------------------------------------------------- metrics.jsonl

    def append_metrics(self, records: Iterable[Mapping]) -> None:
        """Appends one line per record; each record should carry its `step`."""
        lines = [json.dumps(dict(r), default=json_default) + "\n" for r in records]
        if not lines:
            return
        self._makedirs()
        with open(self.file(METRICS), "a") as f:
            f.writelines(lines)
            f.flush()

    def read_metrics(self) -> list[dict]:
        """Every intact record of metrics.jsonl, in order ([] when there is none).
        A line cut short by a kill is skipped."""
        if not self.has(METRICS):
            return []
        return [rec for _, rec in self._metric_lines() if rec is not None]

    def _metric_lines(self) -> list[tuple[str, dict | None]]:
        out = []
        with open(self.file(METRICS)) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    rec = None
                out.append((line, rec if isinstance(rec, dict) else None))
        return out

    def truncate_metrics_after(self, step: int) -> int:
        """Drops the records of steps after `step`, and lines cut short by a
        kill, atomically (rewritten to a temporary file, then renamed). A run
        resumed from its checkpoint at `step` calls this before it logs again,
        so that the steps it replays appear once. Returns the lines dropped."""
        if not self.has(METRICS):
            return 0
        kept, dropped = [], 0
        for line, rec in self._metric_lines():
            step_of = rec.get("step") if rec is not None else None
            if isinstance(step_of, (int, float)) and step_of <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
        if dropped:
            write_text_atomic(self.file(METRICS), "".join(kept))
        return dropped

    # ------------------------------------------------------------------------- status

    def is_finished(self, evaluated: bool = False) -> bool:
        """Training completed (summary.json says so); with `evaluated`, the
        run's evaluation has also merged its metrics into the summary (marked
        `evaluated`; summaries from before that mark have `final/` keys)."""
        summary = self.read_summary()
        if summary.get("status") != COMPLETED:
            return False
        if not evaluated:
            return True
        return bool(summary.get(EVALUATED)) or any(k.startswith("final/") for k in summary)


def is_finished(run_dir: str | os.PathLike, evaluated: bool = False) -> bool:
    """`RunDir(run_dir).is_finished(evaluated)`."""
    return RunDir(run_dir).is_finished(evaluated)


def load_runs(sweep_dir: str | os.PathLike) -> list[dict]:
    """The sweep's completed runs that a report covers (prerequisites, such as
    the pre-trained base, left out), sorted by name. Each is a dict with
    `name`, `dir`, `summary`, `config` (a plain dict) and `curve` (the
    metrics.jsonl records)."""
    sweep_dir = os.fspath(sweep_dir)
    if not os.path.isdir(sweep_dir):
        raise RunDirError(f"{sweep_dir}: not a directory; expected a sweep directory")
    runs = []
    for name in sorted(os.listdir(sweep_dir)):
        run = RunDir(os.path.join(sweep_dir, name))
        if not os.path.isdir(run.path):
            continue
        summary = run.read_summary()
        if summary.get("status") != COMPLETED or summary.get("role") == "prerequisite":
            continue
        runs.append(
            {
                "name": name,
                "dir": run.path,
                "summary": summary,
                "config": run.read_config_dict(),
                "curve": run.read_metrics(),
            }
        )
    return runs
