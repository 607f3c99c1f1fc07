"""Alibi backends (the `alibi` extra): AnchorTabular, KernelShap and TreeShap.

alibi is imported on first use; without it every method here fails with a message naming the
`alibi` extra. Pin `alibi[shap]==0.9.6`: it brings the shap 0.43 alibi was written against.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from explainers.base import Auto, BaseExplainer, InstanceExplanation, Model, Samples
from explainers.errors import ExplainerError, MissingExtraError, UnsupportedModelError
from explainers.shap_backend import Codes, L1Reg, kernel_auto_nsamples, sample_rows, to_instances


def _explainers() -> Any:
    try:
        import alibi.explainers
    except ImportError as exc:
        raise MissingExtraError("alibi", exc.name or "alibi") from None
    return alibi.explainers


class _AlibiBackend(BaseExplainer):
    library = "alibi"

    @staticmethod
    def _version() -> str:
        import alibi

        return str(alibi.__version__)

    def __init__(self, options: Any = None, params: Any = None) -> None:
        _explainers()  # fail at configuration, naming the extra, not on the first request
        super().__init__(options, params)


def _labels(outputs: np.ndarray) -> np.ndarray:
    """Class labels from a predictor's outputs: the argmax of probabilities, or the labels."""
    outputs = np.asarray(outputs)
    return outputs.argmax(axis=1) if outputs.ndim == 2 else outputs


class AnchorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    background_size: int = Field(500, ge=10, le=100_000)
    """Training rows kept: they set the bins and are what anchors sample from."""
    disc_perc: tuple[float, ...] = (25, 50, 75)
    seed: int = 0


class AnchorParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.95, gt=0, le=1)
    delta: float = Field(0.1, gt=0, lt=1)
    tau: float = Field(0.15, gt=0, lt=1)
    batch_size: Samples = 100
    coverage_samples: Samples = 10_000
    beam_size: int = Field(1, ge=1)
    max_anchor_size: int | None = None
    min_samples_start: Samples = 100


class AnchorTabular(_AlibiBackend):
    method = "anchor_tabular"
    Options = AnchorOptions
    Params = AnchorParams

    def _fit(self, model: Model, background: np.ndarray) -> dict[str, Any]:
        train = sample_rows(background, self.options.background_size, self.options.seed)
        return {"train": train, "categories": Codes.learn(model, background).categories}

    def _build(self, model: Model, state: dict[str, Any]) -> Any:
        codes = Codes(state["categories"])
        names = list(model.feature_names)

        def predictor(x: np.ndarray) -> np.ndarray:
            return _labels(model.predict(codes.decode(x)))

        try:
            engine = _explainers().AnchorTabular(
                predictor, names, categorical_names={i: [str(v) for v in vs] for i, vs in codes.categories.items()},
                seed=self.options.seed)
            engine.fit(codes.encode(state["train"], names), disc_perc=self.options.disc_perc)
        except Exception as exc:
            # alibi calls the predictor here and wraps what it raised in its PredictorCallError (an
            # Exception): the predictor's own error (down, refusing) is what to say.
            if isinstance(exc.__cause__, ExplainerError):
                raise exc.__cause__ from None
            raise
        return engine, codes

    def _explain(self, engine: Any, rows: np.ndarray, params: Any) -> tuple[list[InstanceExplanation], list[str]]:
        anchors, codes = engine
        assert self.model is not None
        encoded = codes.encode(rows, list(self.model.feature_names))
        out = []
        for row in encoded:
            result = anchors.explain(row, **params.model_dump())
            prediction = np.asarray(result.raw["prediction"]).reshape(-1)[0]
            out.append(InstanceExplanation(anchor=tuple(result.anchor), precision=float(result.precision),
                                           coverage=float(result.coverage), prediction=prediction.item()))
        return out, list(self.model.output_names or [])


class AlibiShapOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    background_size: int = Field(50, ge=1, le=10_000)
    seed: int = 0
    link: Literal["identity", "logit"] = "identity"


class AlibiKernelParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nsamples: Samples | Auto = 200  # as KernelParams: checked here, not deep in shap
    l1_reg: bool | L1Reg = False


def _task(model: Model) -> str:
    return "regression" if model.task == "regression" else "classification"


class AlibiKernelShap(_AlibiBackend):
    method = "alibi_kernel_shap"
    Options = AlibiShapOptions
    Params = AlibiKernelParams

    def _fit(self, model: Model, background: np.ndarray) -> dict[str, Any]:
        if background.dtype == object:
            raise UnsupportedModelError("alibi's KernelShap takes numeric features only; use method 'kernel'")
        return {"background": sample_rows(background, self.options.background_size, self.options.seed)}

    def _build(self, model: Model, state: dict[str, Any]) -> Any:
        engine = _explainers().KernelShap(model.predict, link=self.options.link, feature_names=list(model.feature_names),
                                          task=_task(model), seed=self.options.seed)
        return engine.fit(state["background"])

    def _auto_counts(self, width: int) -> dict[str, int]:
        return {"nsamples": kernel_auto_nsamples(width)}  # alibi hands "auto" on to shap's KernelExplainer

    def _explain(self, engine: Any, rows: np.ndarray, params: Any) -> tuple[list[InstanceExplanation], list[str]]:
        result = engine.explain(np.asarray(rows, dtype=float), nsamples=params.nsamples, l1_reg=params.l1_reg,
                                silent=True)
        assert self.model is not None
        return to_instances(result.shap_values, result.expected_value, self.model)


class AlibiTreeOptions(AlibiShapOptions):
    feature_perturbation: Literal["interventional", "tree_path_dependent"] = "tree_path_dependent"
    """As for method `tree`: path-dependent is exact; interventional can be off (see shap_backend)."""


class AlibiTreeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    check_additivity: bool = False


class AlibiTreeShap(_AlibiBackend):
    method = "alibi_tree_shap"
    white_box = True
    Options = AlibiTreeOptions
    Params = AlibiTreeParams

    def _fit(self, model: Model, background: np.ndarray) -> dict[str, Any]:
        state = {"background": sample_rows(background, self.options.background_size, self.options.seed)}
        self._build(model, state)
        return state

    def _build(self, model: Model, state: dict[str, Any]) -> Any:
        # The estimator object reads rows in its own column order (fitted on a DataFrame in
        # another order than the schema's): given those, its attributions are mapped back.
        columns = model.estimator_columns() or range(len(model.feature_names))
        engine = _explainers().TreeShap(model.estimator, model_output="raw", task=_task(model), seed=self.options.seed,
                                        feature_names=[model.feature_names[i] for i in columns])
        try:
            if self.options.feature_perturbation == "tree_path_dependent":
                return engine.fit()
            return engine.fit(model.estimator_rows(np.asarray(state["background"], dtype=float)))
        except Exception as exc:  # alibi passes shap's bare Exceptions through
            raise UnsupportedModelError(f"alibi's TreeShap refuses {type(model.estimator).__name__}: {exc}") from exc

    def _explain(self, engine: Any, rows: np.ndarray, params: Any) -> tuple[list[InstanceExplanation], list[str]]:
        assert self.model is not None
        result = engine.explain(self.model.estimator_rows(np.asarray(rows, dtype=float)),
                                check_additivity=params.check_additivity)
        return to_instances(result.shap_values, result.expected_value, self.model,
                            columns=self.model.estimator_columns())
