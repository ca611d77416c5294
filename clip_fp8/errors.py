"""The pipeline's named errors, and the one place that decides what a retry can fix.

Stages raise these with one line that names the bad value (or every failed check) and what to do.
They are deterministic: running the same inputs again gives the same answer, so the Prefect layer
never retries them (``is_transient``) and the CLI prints the line and exits 2. Errors that collect
several failures keep them in ``failures`` and may carry markdown ``reports`` by name (the audit table,
the gate table) that the Prefect layer publishes before the run stops, so the UI shows why.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A deterministic failure: the same inputs fail the same way."""

    def __init__(self, message: str, failures: list[str] | None = None, reports: dict[str, str] | None = None):
        super().__init__(message)
        self.failures = list(failures or [])
        self.reports = dict(reports or {})


class PipelineInputError(PipelineError, ValueError):
    """A user-supplied value (path, id, pattern, size) cannot work."""


class AuditError(PipelineError):
    """Quantization coverage differs from what the configuration asked for."""


class QualityGateError(PipelineError):
    """FP8 costs more quality than the gate allows."""


class SpeedGateError(PipelineError):
    """The FP8 form as served is slower than the speed gate allows (promotion.min_speedup)."""


class GraphCheckError(PipelineError):
    """An exported graph failed its numeric check or the strongly typed pre-flight."""


class ScaleTransferError(PipelineError):
    """Calibrated scales cannot be written into an exported FP8 graph as ModelOpt would have written them."""


class BuildTargetError(PipelineError):
    """A build target's engines run failed, or ran on a worker with another GPU type."""


def collected(error: type[PipelineError], what: str, failures: list[str], reports: dict[str, str] | None = None,
              shown: int = 5) -> PipelineError:
    """One error naming every failure (the first ``shown`` in its message, all in ``failures``)."""
    more = f" (+{len(failures) - shown} more)" if len(failures) > shown else ""
    return error(f"{what}: " + "; ".join(failures[:shown]) + more, failures=failures, reports=reports)


def is_transient(exc: BaseException) -> bool:
    """Worth a retry: I/O hiccups, a flaky GPU, a killed worker. Never bad input, audits, gates, checks."""
    return not isinstance(exc, (PipelineError, KeyboardInterrupt, SystemExit))
