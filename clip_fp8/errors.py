"""Errors that no retry can fix: bad input, failed audits, failed quality gates.

Stages raise these with one line that names the bad value and what to do; the Prefect tasks do not
retry them (see ``flows.pipeline.retry_transient_only``), and the CLI prints the line and exits 2.
"""


class PipelineInputError(ValueError):
    """A user-supplied value (path, id, pattern, size) cannot work."""


class AuditError(RuntimeError):
    """Quantization coverage differs from what the configuration asked for."""


class QualityGateError(RuntimeError):
    """FP8 costs more quality than the gate allows."""


class ValidationError(RuntimeError):
    """An exported graph failed its numeric check or the strongly typed pre-flight."""


DETERMINISTIC_ERRORS = (PipelineInputError, AuditError, QualityGateError, ValidationError)
