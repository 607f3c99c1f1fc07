"""CloudEvents SQL (CESQL) v1: parse an expression once, evaluate it against many events.

    >>> expression = parse("type LIKE 'org.kubeflow.%' AND EXISTS subject")
    >>> expression.evaluate({"type": "org.kubeflow.serving.inference.request"})
    (False, [])
    >>> expression.matches({"type": "org.kubeflow.serving.inference.request", "subject": "m"})
    True

Evaluation never raises: like the spec, it returns a value plus a list of errors
(`CesqlError` subclasses whose `kind` is the TCK's name for them). `matches` is the filter
view: TRUE and no errors.
"""

from pipelines.cesql.builtins import BUILTINS
from pipelines.cesql.context import Event, HasAttributes
from pipelines.cesql.errors import (
    CesqlCastError,
    CesqlError,
    CesqlFunctionEvaluationError,
    CesqlGenericError,
    CesqlMathError,
    CesqlMissingAttributeError,
    CesqlMissingFunctionError,
    CesqlParseError,
)
from pipelines.cesql.expression import Expression, evaluate, parse
from pipelines.cesql.functions import Failure, Function, FunctionRegistry
from pipelines.cesql.values import Value, ValueType

__all__ = [
    "BUILTINS",
    "CesqlCastError",
    "CesqlError",
    "CesqlFunctionEvaluationError",
    "CesqlGenericError",
    "CesqlMathError",
    "CesqlMissingAttributeError",
    "CesqlMissingFunctionError",
    "CesqlParseError",
    "Event",
    "Expression",
    "Failure",
    "Function",
    "FunctionRegistry",
    "HasAttributes",
    "Value",
    "ValueType",
    "evaluate",
    "parse",
]
