"""The explainers' errors: a subtree of infer-logger's, each mapped to one HTTP status in `app.py`.

    InferLoggerError
    └── ExplainerError
        ├── InvalidInputError          400: instances of the wrong width or type; names the shape
        ├── InvalidParametersError     400: an explain parameter that the method does not take
        ├── UnknownModelError          404: no explainer for that model name
        ├── NotReadyError              503: still fitting or warming up
        ├── PredictorError             502: the predictor failed or was unreachable (after retries)
        │   ├── PredictorUnavailableError  502: no answer, or 429/502/503/504, after retries: not the rows
        │   ├── PredictorTimeoutError      504: a passed-on `:predict` the predictor did not answer in time
        │   └── PredictorRefusedError      400: the predictor refused the rows (400, 422; an InvalidInputError too)
        ├── ExplainTimeoutError        504: the explanation outlasted `explain_timeout`
        ├── MissingExtraError          the `explain` or `alibi` extra is not installed (also ImportError)
        ├── UnsupportedModelError      a white-box method given no model, or a model it cannot read
        ├── ArtifactError              an artifact or model file that does not load; names path and cause
        └── SettingsError              settings that do not fit the method or the data (also ConfigError)
"""

from __future__ import annotations

from infer_logger.errors import ConfigError, InferLoggerError


class ExplainerError(InferLoggerError):
    """Root of the explainers' errors."""


class InvalidInputError(ExplainerError, ValueError):
    """The instances do not fit the model's input; the message names the expected shape."""


class InvalidParametersError(ExplainerError, ValueError):
    """Per-request explain parameters the method refuses."""


class UnknownModelError(ExplainerError, LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"Model with name {name} does not exist.")
        self.name = name


class NotReadyError(ExplainerError):
    """The explainer is not fitted or warmed up yet."""


class PredictorError(ExplainerError):
    """The predictor could not answer; `status` is its HTTP status, or None when unreachable."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PredictorUnavailableError(PredictorError):
    """The predictor did not answer (unreachable, timed out, or 429/502/503/504) after the retries:
    its state, not the rows asked about (other rows would fail alike)."""


class PredictorTimeoutError(PredictorError):
    """A client's own request passed on (`:predict`) that the predictor did not answer within
    `timeout`: a gateway's timeout, 504, as an explanation's is (a 502 said the predictor failed)."""


class PredictorRefusedError(PredictorError, InvalidInputError):
    """The predictor refused the rows (400 or 422, in JSON too): input the model cannot take,
    which no retry fixes (a 400 to the client, dead-lettered by the subscriber), not a failure."""


class ExplainTimeoutError(ExplainerError):
    """An explanation that outlasted its deadline (`explain_timeout`); its work is given up."""


class MissingExtraError(ExplainerError, ImportError):
    def __init__(self, extra: str, module: str) -> None:
        super().__init__(
            f"this needs the {extra!r} extra ({module} is not installed): pip install 'infer-logger[{extra}]'"
        )
        self.extra = extra


class UnsupportedModelError(ExplainerError, ValueError):
    """A method that needs the model object (tree, linear) given none, or a model it cannot read."""


class ArtifactError(ExplainerError):
    """A file (explainer artifact, model, background data) that does not load."""

    def __init__(self, path: object, cause: str) -> None:
        super().__init__(f"{path}: {cause}")
        self.path = str(path)
        self.cause = cause


class SettingsError(ExplainerError, ConfigError):
    """Settings that each pass on their own but do not fit the method, the data or the model, found
    when these are read: a ConfigError (exit 2), raised where the explainer's own errors are."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.args = (message,)  # the message names the field itself, as the explainer's others do
