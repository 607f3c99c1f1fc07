"""CESQL errors, one class per error type of the CESQL v1 spec (section 3.3).

    InferLoggerError
    └── CesqlError                       kind = "generic"
        ├── CesqlParseError              kind = "parse"; raised by `parse`
        ├── CesqlMathError               kind = "math"
        ├── CesqlCastError               kind = "cast"
        ├── CesqlMissingFunctionError    kind = "missingFunction"
        ├── CesqlFunctionEvaluationError kind = "functionEvaluation"
        ├── CesqlMissingAttributeError   kind = "missingAttribute"
        └── CesqlGenericError            kind = "generic"

Only `CesqlParseError` is ever raised at callers. Evaluation errors are values: CESQL is total,
so an evaluation always yields a result plus a (possibly empty) list of these errors. `kind` is
the name the CESQL TCK uses for the error type.
"""

from __future__ import annotations

from typing import ClassVar

from infer_logger.errors import InferLoggerError


class CesqlError(InferLoggerError):
    """Root of the CESQL errors; `position` is the 0-based offset in the expression, if known."""

    kind: ClassVar[str] = "generic"

    def __init__(self, message: str, *, position: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.position = position

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, position={self.position!r})"


class CesqlParseError(CesqlError, ValueError):
    """The expression is not valid CESQL; the message quotes it with a caret under `position`."""

    kind = "parse"

    def __init__(self, message: str, *, expression: str, position: int) -> None:
        # Tabs and newlines are legal whitespace but would break the caret's alignment.
        shown = expression.translate(_BLANKS)
        super().__init__(
            f"{message} at position {position}\n  {shown}\n  {' ' * position}^",
            position=position,
        )
        self.reason = message
        self.expression = expression
        self.position: int = position


_BLANKS = str.maketrans("\t\r\n", "   ")


class CesqlMathError(CesqlError):
    """Division or modulo by zero, or a result outside the 32-bit integer range."""

    kind = "math"


class CesqlCastError(CesqlError):
    """A value could not be converted to the type an operator or function needs."""

    kind = "cast"


class CesqlMissingFunctionError(CesqlError):
    """No function with this name accepts this number of arguments."""

    kind = "missingFunction"

    def __init__(self, name: str, arity: int, *, position: int | None = None) -> None:
        super().__init__(f"no function {name} with {arity} argument(s)", position=position)
        self.name = name
        self.arity = arity


class CesqlFunctionEvaluationError(CesqlError):
    """A function rejected its arguments (e.g. a negative length) or failed."""

    kind = "functionEvaluation"


class CesqlMissingAttributeError(CesqlError):
    """The expression addresses an attribute the event does not have."""

    kind = "missingAttribute"

    def __init__(self, attribute: str, *, position: int | None = None) -> None:
        super().__init__(f"missing attribute {attribute!r}", position=position)
        self.attribute = attribute


class CesqlGenericError(CesqlError):
    """Any other evaluation error."""

    kind = "generic"
