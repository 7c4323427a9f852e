"""Studies: the run directory (the only reader and writer of a run's files),
a run's evaluation after training, and the report over a sweep's runs."""

from ftjax.rundir import (
    RunDir,
    is_finished,
    json_default,
    load_runs,
    read_json,
    write_json_atomic,
    write_text_atomic,
)
from ftjax.study.evaluate import (
    default_eval_config,
    evaluate_run,
    memorization,
    training_eval_sets,
)
from ftjax.study.report import Report, Stat, aggregate, aggregate_values, build_report, write_report

__all__ = [
    "Report",
    "RunDir",
    "Stat",
    "aggregate",
    "aggregate_values",
    "build_report",
    "default_eval_config",
    "evaluate_run",
    "is_finished",
    "json_default",
    "load_runs",
    "memorization",
    "read_json",
    "training_eval_sets",
    "write_json_atomic",
    "write_report",
    "write_text_atomic",
]
