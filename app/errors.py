"""Domain errors and their one mapping to HTTP responses."""

from __future__ import annotations

from typing import Any


class AppError(Exception):
    """Base of every error a person may see; `code` is stable, `detail` is for people."""

    status_code = 500
    code = "internal_error"

    def __init__(self, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "detail": self.detail}
        if self.field:
            body["field"] = self.field
        return body


class Unauthorized(AppError):
    """No valid credentials: sign in, or send `Authorization: Bearer <token>`."""

    status_code = 401
    code = "unauthorized"


class Forbidden(AppError):
    """Signed in, but not allowed to do this (a role, or a missing or wrong CSRF token)."""

    status_code = 403
    code = "forbidden"


class NotFound(AppError):
    status_code = 404
    code = "not_found"


class Conflict(AppError):
    status_code = 409
    code = "conflict"


class Invalid(AppError):
    status_code = 422
    code = "invalid_request"


class Upstream(AppError):
    """An outside system (registry, history source, model server) failed or is unreachable."""

    status_code = 503
    code = "upstream_unavailable"


# Request validation errors with their own codes, so clients can tell them apart.
class InvalidPeriod(Invalid):
    code = "invalid_period"


class NoHistoryInPeriod(Invalid):
    code = "no_history_in_period"


class PeriodTooLong(Invalid):
    code = "period_too_long"


class PartnerNotFound(Invalid):
    code = "partner_not_found"


class ModelNotFound(Invalid):
    code = "model_not_found"


class ModelVersionNotFound(Invalid):
    code = "model_version_not_found"


class ModelSignatureMissing(Invalid):
    code = "model_signature_missing"


class SourceUnknown(Invalid):
    code = "source_unknown"


class InvalidPopulation(Invalid):
    """A population file the job cannot use: the detail names the column and the first bad lines."""

    code = "invalid_population"


class PopulationTooLarge(InvalidPopulation):
    status_code = 413
    code = "population_too_large"


class SchemaMismatch(Invalid):
    """The history table lacks columns the model needs, or has incompatible types."""

    code = "schema_mismatch"


# Failures during a job.
class JobCancelled(AppError):
    status_code = 409
    code = "cancelled"


class DeploymentFailed(Upstream):
    code = "deployment_failed"


class ScoringFailed(Upstream):
    code = "scoring_failed"


class ModelServerDown(ScoringFailed):
    """The model server kept failing or could not be reached through every retry: re-creating it may help."""

    code = "model_server_down"


class TooManyRejectedRows(ScoringFailed):
    code = "too_many_rejected_rows"


class DeadlineExceeded(AppError):
    code = "deadline_exceeded"


class TooManyAttempts(AppError):
    code = "too_many_attempts"


class ReconciliationFailed(AppError):
    code = "reconciliation_failed"


class DatabaseUnavailable(Upstream):
    """The job database cannot be reached (down, restarting, refusing connections)."""

    code = "database_unavailable"


class StorageFull(AppError):
    """The result store has no space left for a job's files."""

    status_code = 507
    code = "storage_full"


class EnvironmentFailed(AppError):
    """The model's own Python environment cannot be found, resolved or installed on this worker."""

    code = "environment_failed"


class ReferenceMismatch(AppError):
    """The deployed model does not give the scores its reference says it should."""

    code = "reference_mismatch"

    def __init__(self, detail: str, *, outcome: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.outcome = outcome  # the comparison, for the job page, when one was made
