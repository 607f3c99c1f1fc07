"""The explainer contract: what is explained (`Model`), how (`Explainer`) and the result (`Explanation`).

Every method gives one JSON shape (`Explanation.to_dict()`), with one item per instance so that
the audit store and the indexer split it by instance (`{"explanations": [...]}`):

    {"method": "kernel", "library": "shap 0.51.0", "params": {"nsamples": 200, ...},
     "feature_names": [...], "output_names": ["setosa", ...],
     "explanations": [
        {"method": "kernel", "params": {...},                          # SHAP: per output
         "outputs": [{"name": "setosa", "base_value": 0.33, "value": 0.9,
                      "attributions": {"petal length (cm)": 0.41, ...}}]},
        {"method": "anchor_tabular", "params": {...},                  # Anchors
         "anchor": ["petal width (cm) <= 0.80"], "precision": 0.98, "coverage": 0.33, "prediction": 0}]}

For SHAP `value` is `base_value + sum(attributions)`: the model output the method explains
(a probability for random forests and black-box classifiers, the margin for linear and boosted
models, the prediction for regressors).
"""

from __future__ import annotations

import collections
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo
from pydantic_core import PydanticCustomError

from explainers.errors import InvalidParametersError, NotReadyError, UnsupportedModelError

if TYPE_CHECKING:
    import numpy as np

PredictFn = Callable[["np.ndarray"], "np.ndarray"]
"""Rows `(n, features)` in `feature_names` order (float, or object when some are strings) to
outputs `(n,)` or `(n, outputs)`. May be a black-box call to a predictor."""


_REWRITTEN = re.compile(r'[\s",:\[\]{}]')


def named_twice(names: Sequence[str]) -> str | None:
    """The names given more than once, quoted and joined (attributions are keyed by feature name:
    one of the two was lost); None when each is given once."""
    counts = collections.Counter(names)
    twice = [repr(name) for name, count in counts.items() if count > 1]
    return ", ".join(twice) or None


def match_columns(own: Sequence[str], names: Sequence[str]) -> list[int]:
    """Where each of an estimator's features (`own`, in its order) sits in `names`: matched by
    name, or by name as LightGBM rewrites it (blanks and `",:[]{}` become `_`: fitted on
    `sepal length (cm)`, it names `sepal_length_(cm)`). UnsupportedModelError for other features."""
    for key in (str, lambda name: _REWRITTEN.sub("_", name)):
        keys = [key(name) for name in names]
        if sorted(map(key, own)) == sorted(keys) and len(set(keys)) == len(keys):
            return [keys.index(key(name)) for name in own]
    raise UnsupportedModelError(f"the model was fitted on features {list(own)}, the data has {list(names)}")


@dataclass(frozen=True)
class Model:
    """What an explainer explains."""

    predict: PredictFn
    feature_names: list[str]
    output_names: list[str] | None = None
    """Names of the outputs (class labels), when known."""
    estimator: Any = None
    """The fitted model object (white-box mode), for the methods that read it (tree, linear)."""
    categorical: tuple[str, ...] = ()
    """Features whose values are strings."""
    task: Literal["classification", "regression"] | None = None

    def estimator_columns(self) -> list[int] | None:
        """Where the estimator's own features (fitted on a DataFrame) sit in `feature_names`, when
        its order differs: methods that give rows to the estimator object itself reorder them."""
        own = getattr(self.estimator, "feature_names_in_", None)
        if own is None:
            return None
        columns = match_columns([str(n) for n in own], list(self.feature_names))
        return None if columns == list(range(len(columns))) else columns

    def estimator_rows(self, rows: np.ndarray) -> np.ndarray:
        """`rows` (in `feature_names` order) as the estimator object reads them: in its own order."""
        columns = self.estimator_columns()
        return rows if columns is None else rows[:, columns]

    def names_for(self, n_outputs: int) -> list[str]:
        if self.output_names and len(self.output_names) == n_outputs:
            return list(self.output_names)
        return [f"output-{i}" for i in range(n_outputs)]


@dataclass(frozen=True, slots=True)
class OutputAttribution:
    name: str
    base_value: float
    value: float
    attributions: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "base_value": self.base_value, "value": self.value,
                "attributions": self.attributions}


@dataclass(frozen=True, slots=True)
class InstanceExplanation:
    """One instance: SHAP outputs, or an anchor with its precision and coverage."""

    outputs: tuple[OutputAttribution, ...] = ()
    anchor: tuple[str, ...] | None = None
    precision: float | None = None
    coverage: float | None = None
    prediction: Any = None

    def to_dict(self) -> dict[str, Any]:
        if self.anchor is not None:
            return {"anchor": list(self.anchor), "precision": self.precision, "coverage": self.coverage,
                    "prediction": self.prediction}
        return {"outputs": [o.to_dict() for o in self.outputs]}


@dataclass(frozen=True)
class Explanation:
    method: str
    params: dict[str, Any]
    feature_names: list[str]
    instances: list[InstanceExplanation]
    output_names: list[str] = field(default_factory=list)
    library: str = ""

    def to_dict(self) -> dict[str, Any]:
        head = {"method": self.method, "params": self.params}
        return {
            **head,
            "library": self.library,
            "feature_names": self.feature_names,
            "output_names": self.output_names,
            "explanations": [{**head, **item.to_dict()} for item in self.instances],
        }

    @staticmethod
    def concat(parts: Sequence[Explanation]) -> Explanation:
        """The explanations of consecutive chunks of one batch, as one."""
        first = parts[0]
        return Explanation(first.method, first.params, first.feature_names,
                           [i for p in parts for i in p.instances], first.output_names, first.library)


@runtime_checkable
class Explainer(Protocol):
    """Fit (or restore) once, then explain batches; thread-safe once fitted."""

    method: ClassVar[str]

    def fit(self, model: Model, background: np.ndarray) -> None: ...

    def restore(self, model: Model, state: dict[str, Any]) -> None: ...

    def state(self) -> dict[str, Any]: ...

    def params(self, overrides: Mapping[str, Any] | None = None, *, max_samples: int | None = None) -> BaseModel: ...

    def explain(self, rows: np.ndarray, params: BaseModel | Mapping[str, Any] | None = None) -> Explanation: ...


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _within_limit(value: int, info: ValidationInfo) -> int:
    limit = (info.context or {}).get("max_samples")
    if limit is not None and value > limit:
        raise PydanticCustomError("over_limit", "{value} is over this server's limit of {limit} (max_samples)",
                                  {"value": value, "limit": limit})
    return value


Samples = Annotated[int, Field(ge=1), AfterValidator(_within_limit)]
"""A per-request count of samples or model evaluations: each costs model rows and memory, so it is
at least 1 and at most the server's `max_samples` (given as validation context)."""


def _auto_held_to_limit(value: str, info: ValidationInfo) -> str | int:
    context = info.context or {}
    limit, count = context.get("max_samples"), (context.get("auto") or {}).get(info.field_name)
    if limit is not None and count is not None and count > limit:
        return int(limit)
    return value


Auto = Annotated[Literal["auto"], AfterValidator(_auto_held_to_limit)]
"""`Samples`' "auto": the library's own count for the model, which can be any size (kernel SHAP's
is 2 * features + 2048): at most `max_samples` (`BaseExplainer._auto_counts`), never refused (the
library's own default: a wide model's would refuse every request, or fail the start)."""


def checked(kind: type[BaseModel], values: Mapping[str, Any] | None, what: str,
            context: Mapping[str, Any] | None = None) -> BaseModel:
    try:
        return kind.model_validate(dict(values or {}), context=context)
    except ValidationError as exc:
        allowed = ", ".join(kind.model_fields) or "none"
        problems = "; ".join(f"{field or what}: {message}" for field, message in _problems(exc))
        raise InvalidParametersError(f"{what}: {problems} (allowed: {allowed})") from None


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    """(place, message) per bad value: the field, and the index in a list field (`disc_perc.2`).
    A union (`nsamples`: a number or "auto") fails once per branch, its locations naming the
    branches (left out here): a type mismatch reads "a or b", a bad value of the matching type
    (over a limit, say) alone."""
    by_field: dict[str, list[Any]] = {}
    for error in exc.errors():
        loc = error["loc"]
        place = ".".join([str(loc[0]), *(str(part) for part in loc[1:] if isinstance(part, int))]) if loc else ""
        by_field.setdefault(place, []).append(error)
    out = []
    for name, errors in by_field.items():
        if len(errors) > 1 and any(e["type"] not in _TYPE_MISMATCH for e in errors):
            errors = [next(e for e in errors if e["type"] not in _TYPE_MISMATCH)]
        out.append((name, " or ".join(e["msg"] for e in errors)))
    return out


_TYPE_MISMATCH = frozenset({"int_parsing", "int_type", "int_from_float", "float_parsing", "float_type",
                            "literal_error", "string_type", "bool_parsing", "bool_type", "string_pattern_mismatch"})


class BaseExplainer(ABC):
    """The shared part of the backends: options, parameters, and one engine per worker thread
    (the libraries' explainers keep per-call state on themselves, so they are not thread-safe)."""

    method: ClassVar[str]
    library: ClassVar[str] = "shap"
    white_box: ClassVar[bool] = False
    asks_rows_alone: ClassVar[bool] = False
    """Whether the method asks the model for each explained row alone before anything else (the
    server then asks the predictor for them ahead: `PredictorClient.asking_ahead`)."""
    Options: ClassVar[type[BaseModel]] = NoOptions
    Params: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None) -> None:
        self.options: Any = checked(self.Options, options, f"{self.method} options")
        self.defaults: BaseModel = checked(self.Params, params, f"{self.method} parameters")
        self.model: Model | None = None
        self._state: dict[str, Any] | None = None
        self._local = threading.local()
        self._generation = 0

    def fit(self, model: Model, background: np.ndarray) -> None:
        self._check(model)
        # One raw row kept for warming up a restored explainer (some states hold encoded rows).
        self._state = {**self._fit(model, background), "example": background[:1].copy()}
        self.model = model
        self._generation += 1

    def restore(self, model: Model, state: dict[str, Any]) -> None:
        self._check(model)
        self.model, self._state = model, dict(state)
        self._generation += 1
        self._engine()  # built now: a state the method cannot build on fails here, not on each request

    def state(self) -> dict[str, Any]:
        if self._state is None:
            raise NotReadyError(f"the {self.method} explainer is not fitted")
        return dict(self._state)

    def params(self, overrides: Mapping[str, Any] | None = None, *, max_samples: int | None = None) -> BaseModel:
        """The defaults with `overrides` applied, checked (counts of samples against `max_samples`)."""
        merged = {**self.defaults.model_dump(), **(overrides or {})}
        auto = self._auto_counts(len(self.model.feature_names)) if self.model is not None else {}
        return checked(self.Params, merged, "parameters", {"max_samples": max_samples, "auto": auto})

    def _auto_counts(self, width: int) -> dict[str, int]:
        """The count the library makes of each parameter's "auto" for a model of `width` features
        (the most that vary in a row), as it decides it; a parameter left out is not counted."""
        return {}

    def explain(self, rows: np.ndarray, params: BaseModel | Mapping[str, Any] | None = None) -> Explanation:
        if self.model is None or self._state is None:
            raise NotReadyError(f"the {self.method} explainer is not fitted")
        chosen = params if isinstance(params, BaseModel) else self.params(params)
        engine = self._engine()
        instances, outputs = self._explain(engine, rows, chosen)
        return Explanation(self.method, chosen.model_dump(), list(self.model.feature_names), instances,
                           outputs, f"{self.library} {self._version()}")

    def _engine(self) -> Any:
        local = self._local
        if getattr(local, "generation", None) != self._generation:
            assert self.model is not None and self._state is not None
            local.engine, local.generation = self._build(self.model, self._state), self._generation
        return local.engine

    def _check(self, model: Model) -> None:
        if self.white_box and model.estimator is None:
            raise UnsupportedModelError(
                f"method {self.method!r} reads the model itself: give a model file (white-box mode), "
                "or choose a black-box method (kernel, permutation, partition, auto)"
            )

    @abstractmethod
    def _fit(self, model: Model, background: np.ndarray) -> dict[str, Any]:
        """What fitting learns (kept in artifacts): the background summary, categories..."""

    @abstractmethod
    def _build(self, model: Model, state: dict[str, Any]) -> Any:
        """The library's explainer over the fitted state (one per worker thread)."""

    @abstractmethod
    def _explain(self, engine: Any, rows: np.ndarray, params: Any) -> tuple[list[InstanceExplanation], list[str]]:
        """Per-instance results and the output names."""

    @staticmethod
    @abstractmethod
    def _version() -> str: ...
