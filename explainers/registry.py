"""Explain methods by name: one table, classes imported on first use (shap and alibi are heavy)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from explainers.base import BaseExplainer
from explainers.errors import ExplainerError

METHODS: Mapping[str, str] = {
    "tree": "explainers.shap_backend:TreeShap",
    "kernel": "explainers.shap_backend:KernelShap",
    "linear": "explainers.shap_backend:LinearShap",
    "permutation": "explainers.shap_backend:PermutationShap",
    "partition": "explainers.shap_backend:PartitionShap",
    "auto": "explainers.shap_backend:AutoShap",
    "anchor_tabular": "explainers.alibi_backend:AnchorTabular",
    "alibi_kernel_shap": "explainers.alibi_backend:AlibiKernelShap",
    "alibi_tree_shap": "explainers.alibi_backend:AlibiTreeShap",
}
WHITE_BOX = frozenset({"tree", "linear", "alibi_tree_shap"})
"""Methods that read the model object: they need a model file, not only a predictor URL."""
ALIBI = frozenset(name for name, target in METHODS.items() if ".alibi_backend:" in target)


class UnknownMethodError(ExplainerError, ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown explain method {name!r} (known: {', '.join(METHODS)})")
        self.name = name


def explainer_class(name: str) -> type[BaseExplainer]:
    target = METHODS.get(name)
    if target is None:
        raise UnknownMethodError(name)
    module, _, attribute = target.partition(":")
    cls: type[BaseExplainer] = getattr(importlib.import_module(module), attribute)
    return cls


def create(name: str, options: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None) -> BaseExplainer:
    """A new, unfitted explainer; options are fit-time, params the per-request defaults."""
    return explainer_class(name)(options, params)
