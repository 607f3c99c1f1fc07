"""Explainers: SHAP and Alibi backends behind one protocol, a batched black-box predictor client,
the explainer server and the explain-on-event subscriber.

Importing this package is light: shap, alibi, pandas and scikit-learn load on first use.
"""

from explainers.base import Explainer, Explanation, InstanceExplanation, Model, OutputAttribution
from explainers.errors import (
    ArtifactError,
    ExplainerError,
    InvalidInputError,
    InvalidParametersError,
    MissingExtraError,
    NotReadyError,
    PredictorError,
    UnknownModelError,
    UnsupportedModelError,
)
from explainers.registry import METHODS, create, explainer_class

__all__ = [
    "METHODS",
    "ArtifactError",
    "Explainer",
    "ExplainerError",
    "Explanation",
    "InstanceExplanation",
    "InvalidInputError",
    "InvalidParametersError",
    "MissingExtraError",
    "Model",
    "NotReadyError",
    "OutputAttribution",
    "PredictorError",
    "UnknownModelError",
    "UnsupportedModelError",
    "create",
    "explainer_class",
]
