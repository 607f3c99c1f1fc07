"""SHAP backends: tree, kernel, linear (the legacy API) and permutation, partition, auto (maskers).

Works with shap 0.43 (the alibi extra's: a list of per-output arrays) and shap >= 0.45 (one
`(n, features, outputs)` array): `_normalize` brings both to `(n, features, outputs)`.
Named `shap_backend` so that `import shap` in here is the library.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from explainers.base import (
    Auto,
    BaseExplainer,
    InstanceExplanation,
    Model,
    OutputAttribution,
    PredictFn,
    Samples,
)
from explainers.errors import (
    InvalidInputError,
    InvalidParametersError,
    MissingExtraError,
    PredictorError,
    UnsupportedModelError,
)


def _shap() -> Any:
    try:
        import shap
    except ImportError as exc:
        raise MissingExtraError("explain", exc.name or "shap") from None
    return shap


def sample_rows(data: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """At most `k` rows, drawn without replacement (the same ones every time)."""
    if len(data) <= k:
        return data
    return data[np.sort(np.random.default_rng(seed).choice(len(data), k, replace=False))]


def _normalize(values: Any, base: Any, n: int, per_instance_base: bool) -> tuple[np.ndarray, np.ndarray]:
    """`(n, features, outputs)` values and `(n, outputs)` base values, whatever the shap version."""
    if isinstance(values, list):  # shap < 0.45: one array per output
        values = np.stack([np.asarray(v, dtype=float) for v in values], axis=-1)
    values = np.asarray(values, dtype=float)
    if values.ndim == 2:
        values = values[:, :, None]
    k = values.shape[2]
    base = np.asarray(base, dtype=float)
    if base.ndim == 0 or (base.ndim == 1 and not per_instance_base):
        base = np.broadcast_to(base.reshape(1, -1), (n, k))
    elif base.ndim == 1:
        base = base.reshape(n, 1)
    return values, np.broadcast_to(base, (n, k))


def to_instances(values: Any, base: Any, model: Model, *, per_instance_base: bool = False,
                 names: list[str] | None = None,
                 columns: list[int] | None = None) -> tuple[list[InstanceExplanation], list[str]]:
    """`columns`: the values are in the estimator's order, these positions of `model.feature_names`."""
    n = len(values[0]) if isinstance(values, list) else len(values)
    vals, bases = _normalize(values, base, n, per_instance_base)
    if columns is not None:
        vals = vals[:, np.argsort(columns), :]
    k = vals.shape[2]
    if names is None:
        labels = model.output_names or []
        # One margin output of a binary classifier explains its positive class.
        names = [str(labels[1])] if k == 1 and len(labels) == 2 else model.names_for(k)
    features = list(model.feature_names)
    out = []
    for i in range(n):
        outputs = tuple(
            OutputAttribution(names[j], float(bases[i, j]), float(bases[i, j] + vals[i, :, j].sum()),
                              dict(zip(features, vals[i, :, j].tolist())))
            for j in range(k)
        )
        out.append(InstanceExplanation(outputs=outputs))
    return out, names


class Codes:
    """String features as the ordinal codes alibi wants, and back."""

    def __init__(self, categories: dict[int, list[Any]]) -> None:
        self.categories = categories
        self.index = {i: {v: c for c, v in enumerate(values)} for i, values in categories.items()}

    @classmethod
    def learn(cls, model: Model, background: np.ndarray) -> Codes:
        names = list(model.feature_names)
        return cls({names.index(f): sorted({v for v in background[:, names.index(f)]}, key=str)
                    for f in model.categorical})

    def encode(self, rows: np.ndarray, names: list[str]) -> np.ndarray:
        if not self.categories:
            return np.asarray(rows, dtype=float)
        out = np.array(rows, dtype=object)
        for i, index in self.index.items():
            try:
                out[:, i] = [index[v] for v in out[:, i]]
            except KeyError as exc:
                known = ", ".join(map(str, self.categories[i]))
                raise InvalidInputError(f"{names[i]}: {exc.args[0]!r} is not a known value ({known})") from None
        return out.astype(float)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        if not self.categories:
            return codes
        out = np.asarray(codes, dtype=object).copy()
        for i, values in self.categories.items():
            out[:, i] = np.asarray(values, dtype=object)[np.asarray(codes[:, i], dtype=int)]
        return out


def numeric_outputs(predict: PredictFn, method: str) -> PredictFn:
    """`predict`, refusing outputs that are not numbers: class labels (a classifier's `predict`
    over V1) failed deep in shap (TypeError, numba's TypingError) as a 500."""

    def numeric(rows: np.ndarray) -> np.ndarray:
        outputs = np.asarray(predict(rows))
        if outputs.dtype.kind not in "biuf":
            shown = ", ".join(map(repr, outputs.reshape(-1)[:3].tolist()))
            raise PredictorError(f"the predictor answered labels ({shown}, ...), not numbers: the {method} "
                                 "method explains numeric outputs; serve class probabilities, or name a "
                                 "numeric V2 output (`output`)")
        return outputs

    return numeric


class _Background(BaseModel):
    model_config = ConfigDict(extra="forbid")

    background_size: int = Field(50, ge=1, le=10_000)
    """Background rows kept (sampled, or k-means centres for kernel)."""
    seed: int = 0


class _ShapBackend(BaseExplainer):
    library = "shap"

    @staticmethod
    def _version() -> str:
        return str(_shap().__version__)

    def _fit(self, model: Model, background: np.ndarray) -> dict[str, Any]:
        state = {"background": sample_rows(background, self.options.background_size, self.options.seed)}
        self._build(model, state)  # refuses unsupported models now, not on the first request
        return state


# -- legacy API: tree, kernel, linear ------------------------------------------------------------


class TreeOptions(_Background):
    feature_perturbation: Literal["interventional", "tree_path_dependent"] = "tree_path_dependent"
    """`tree_path_dependent` is exact and needs no background. `interventional` (shap 0.43 and 0.51,
    scikit-learn 1.9) is off by a constant when background values sit on split thresholds."""
    model_output: Literal["raw", "probability", "log_loss"] = "raw"


class TreeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    check_additivity: bool = False


class TreeShap(_ShapBackend):
    method = "tree"
    white_box = True
    Options = TreeOptions
    Params = TreeParams

    def _build(self, model: Model, state: dict[str, Any]) -> Any:
        shap = _shap()
        interventional = self.options.feature_perturbation == "interventional"
        try:
            return shap.TreeExplainer(model.estimator,
                                      data=model.estimator_rows(state["background"]) if interventional else None,
                                      feature_perturbation=self.options.feature_perturbation,
                                      model_output=self.options.model_output)
        except Exception as exc:  # shap raises bare Exceptions for models it cannot read
            raise UnsupportedModelError(f"shap's TreeExplainer refuses {type(model.estimator).__name__}: {exc}") from exc

    def _explain(self, engine: Any, rows: np.ndarray, params: Any) -> tuple[list[InstanceExplanation], list[str]]:
        assert self.model is not None
        values = engine.shap_values(self.model.estimator_rows(np.asarray(rows, dtype=float)),
                                    check_additivity=params.check_additivity)
        return to_instances(values, engine.expected_value, self.model, columns=self.model.estimator_columns())


class KernelOptions(_Background):
    summarize: Literal["kmeans", "sample"] = "kmeans"
    """k-means centres (weighted; numeric features only) or a sample of the background."""
    link: Literal["identity", "logit"] = "identity"
    """`identity`: a random forest's 0/1 probabilities make `logit` NaN."""


L1Reg = Annotated[str, StringConstraints(pattern=r"^(auto|aic|bic|num_features\([1-9]\d*\))$")]
"""The l1_reg strings shap's KernelExplainer takes; `num_features(0)` kept none (all attributions 0)."""


class KernelParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Bounded here: shap fails on 0 or fewer deep inside (a 500), and an unknown l1_reg inside sklearn.
    nsamples: Samples | Auto = 200
    """Coalitions per instance; each costs one model row per background row."""
    l1_reg: bool | L1Reg = False
    """shap >= 0.45 keeps only 10 features unless this is False."""


class KernelShap(_ShapBackend):
    method = "kernel"
    asks_rows_alone = True  # f(x) for each row, then one call for all its coalitions
    Options = KernelOptions
    Params = KernelParams

    def _fit(self, model: Model, background: np.ndarray) -> dict[str, Any]:
        o = self.options
        if o.summarize == "kmeans" and background.dtype != object and len(background) > o.background_size:
            summary = _shap().kmeans(background, o.background_size)
            return {"background": np.asarray(summary.data), "weights": np.asarray(summary.weights)}
        return {"background": sample_rows(background, o.background_size, o.seed), "weights": None}

    def _build(self, model: Model, state: dict[str, Any]) -> Any:
        shap = _shap()
        data = state["background"]
        if state.get("weights") is not None:
            from shap.utils._legacy import DenseData

            data = DenseData(data, list(model.feature_names), None, np.array(state["weights"], dtype=float))
        return shap.KernelExplainer(numeric_outputs(model.predict, self.method), data, link=self.options.link)

    def _explain(self, engine: Any, rows: np.ndarray, params: Any) -> tuple[list[InstanceExplanation], list[str]]:
        try:
            values = engine.shap_values(rows, nsamples=params.nsamples, l1_reg=params.l1_reg, silent=True)
        except ValueError as exc:
            # scikit-learn's LassoLarsIC needs more samples than features + 1: for `aic`/`bic` shap
            # fits it on the coalitions (nsamples, at most 2^M - 2 for the M features that differ
            # from the background), so it depends on the row too. Was a 500.
            if params.l1_reg in ("aic", "bic") and "LassoLarsIC" in str(exc):
                raise InvalidParametersError(
                    f"l1_reg {params.l1_reg!r} needs more coalitions than features + 1 (nsamples "
                    f"{params.nsamples}, and at most 2^M - 2 for the M features of a row that differ "
                    f"from the background): raise nsamples, or use another l1_reg") from None
            raise
        assert self.model is not None
        return to_instances(values, engine.expected_value, self.model)

    def _auto_counts(self, width: int) -> dict[str, int]:
        return {"nsamples": kernel_auto_nsamples(width)}


def kernel_auto_nsamples(width: int) -> int:
    """What shap's KernelExplainer makes of nsamples "auto" for `width` features: 2 * M + 2048
    coalitions, at most all of them (2^M - 2) for M <= 30."""
    count = 2 * width + 2**11
    return min(count, 2**width - 2) if width <= 30 else count


class LinearShap(_ShapBackend):
    method = "linear"
    white_box = True
    Options = _Background

    def _build(self, model: Model, state: dict[str, Any]) -> Any:
        shap = _shap()
        try:
            return shap.LinearExplainer(model.estimator,
                                        shap.maskers.Independent(model.estimator_rows(state["background"])))
        except Exception as exc:
            raise UnsupportedModelError(f"shap's LinearExplainer refuses {type(model.estimator).__name__}: {exc}") from exc

    def _explain(self, engine: Any, rows: np.ndarray, params: Any) -> tuple[list[InstanceExplanation], list[str]]:
        assert self.model is not None
        values = engine.shap_values(self.model.estimator_rows(np.asarray(rows, dtype=float)))
        return to_instances(values, engine.expected_value, self.model, columns=self.model.estimator_columns())


# -- masker API: permutation, partition, auto -----------------------------------------------------


class MaskerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_evals: Samples | Auto = "auto"
    """Model evaluations per instance (each over the background rows); at least 2 * features + 1."""
    batch_size: Samples | Auto = "auto"


class _MaskerShap(_ShapBackend):
    """Maskers compare numbers: string features travel as ordinal codes, decoded for the model."""

    Options = _Background
    Params = MaskerParams

    def _fit(self, model: Model, background: np.ndarray) -> dict[str, Any]:
        codes = Codes.learn(model, background)
        rows = sample_rows(background, self.options.background_size, self.options.seed)
        state = {"background": codes.encode(rows, list(model.feature_names)), "categories": codes.categories}
        self._build(model, state)
        return state

    def _build(self, model: Model, state: dict[str, Any]) -> Any:
        codes = Codes(state.get("categories") or {})
        predict = numeric_outputs(model.predict, self.method)
        return self._engine_for(model, lambda x: predict(codes.decode(x)), state["background"]), codes

    def _engine_for(self, model: Model, predict: Any, background: np.ndarray) -> Any:
        raise NotImplementedError

    def _explain(self, engine: Any, rows: np.ndarray, params: Any) -> tuple[list[InstanceExplanation], list[str]]:
        assert self.model is not None
        engine, codes = engine
        rows = codes.encode(rows, list(self.model.feature_names))
        accepted = inspect.signature(engine.__call__).parameters
        wanted = {"max_evals": self._max_evals(params.max_evals), "batch_size": params.batch_size, "silent": True,
                  "check_additivity": False}
        result = engine(rows, **{k: v for k, v in wanted.items() if k in accepted})
        return to_instances(result.values, result.base_values, self.model, per_instance_base=True)

    def _auto_counts(self, width: int) -> dict[str, int]:
        # Permutation: 10 permutations, forwards and back. batch_size: shap's Explainer.__call__ takes
        # the masker's default_batch_size (the tabular ones have none), else 10.
        return {"max_evals": 10 * 2 * width, "batch_size": 10}

    def _max_evals(self, value: int | str) -> int | str:
        assert self.model is not None
        floor = 2 * len(self.model.feature_names) + 1  # one full permutation, forwards and back
        return value if value == "auto" else max(int(value), floor)


class PermutationShap(_MaskerShap):
    method = "permutation"

    def _engine_for(self, model: Model, predict: Any, background: np.ndarray) -> Any:
        shap = _shap()
        masker = shap.maskers.Independent(background, max_samples=len(background))
        return shap.PermutationExplainer(predict, masker, seed=self.options.seed)


class PartitionShap(_MaskerShap):
    method = "partition"

    def _engine_for(self, model: Model, predict: Any, background: np.ndarray) -> Any:
        shap = _shap()
        masker = shap.maskers.Partition(background, max_samples=len(background))
        return shap.PartitionExplainer(predict, masker)

    def _auto_counts(self, width: int) -> dict[str, int]:
        return {**super()._auto_counts(width), "max_evals": 500}  # shap's PartitionExplainer


class AutoShap(_MaskerShap):
    """shap.Explainer's own choice: tree or linear for such a model object, else exact or permutation."""

    method = "auto"
    _black_box = True  # whether the engine calls the model (else it reads the estimator: tree, linear)

    def _engine_for(self, model: Model, predict: Any, background: np.ndarray) -> Any:
        shap = _shap()
        masker = shap.maskers.Independent(background, max_samples=len(background))
        seed = self.options.seed
        # The estimator's own engines take rows in its column order: when the schema's differs, the
        # black box (`predict` reorders by name) keeps the attributions on the right features.
        if model.estimator is not None and not model.categorical and model.estimator_columns() is None:
            # Trees without a masker (path-dependent: exact), linear models with one; else the black box.
            for args in ((model.estimator,), (model.estimator, masker)):
                try:
                    engine = shap.Explainer(*args, algorithm="auto", seed=seed)
                except Exception:  # noqa: BLE001, S112 - shap says "not my kind of model" with bare Exceptions
                    continue
                self._black_box = False
                return engine
        self._black_box = True
        return shap.Explainer(predict, masker, algorithm="auto", seed=seed)

    def _auto_counts(self, width: int) -> dict[str, int]:
        if not self._black_box:  # shap's tree and linear engines take neither
            return {}
        # shap.Explainer over an Independent masker: exact (every coalition) up to 10 features,
        # else permutation
        return {**super()._auto_counts(width), **({"max_evals": 2**width} if width <= 10 else {})}
