"""Explainer artifacts: what fitting learned, saved with joblib and loaded at start instead of refitting.

An artifact holds the method, its options and default parameters, the fitted state (the
background summary, the anchors' training sample and categories...), the names of the features
and outputs, and the library versions. It never holds the model: that is the live predictor (or
the model file), attached when the artifact is loaded. Artifacts are pickles: load only your own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from explainers.base import BaseExplainer, Model
from explainers.errors import ArtifactError, ExplainerError
from explainers.registry import create

FORMAT = "infer-logger-explainer"
VERSION = 1


@dataclass(frozen=True)
class Artifact:
    method: str
    options: dict[str, Any]
    params: dict[str, Any]
    state: dict[str, Any]
    feature_names: list[str]
    categorical: tuple[str, ...] = ()
    output_names: list[str] | None = None
    libraries: dict[str, str] = field(default_factory=dict)

    def explainer(self, model: Model) -> BaseExplainer:
        explainer = create(self.method, self.options, self.params)
        explainer.restore(model, self.state)
        return explainer


def save_artifact(path: str | Path, explainer: BaseExplainer) -> Path:
    """Write atomically (a temporary file renamed), so a reader never sees half an artifact."""
    import joblib

    assert explainer.model is not None, "fit the explainer first"
    model = explainer.model
    payload = {
        "format": FORMAT, "version": VERSION, "method": explainer.method,
        "options": explainer.options.model_dump(), "params": explainer.defaults.model_dump(),
        "state": explainer.state(), "feature_names": list(model.feature_names),
        "categorical": list(model.categorical), "output_names": model.output_names,
        "libraries": _versions(),
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    joblib.dump(payload, temporary)
    os.replace(temporary, target)
    return target


def load_artifact(path: str | Path) -> Artifact:
    """The artifact at `path`; ArtifactError naming the path and the cause when it does not load."""
    import joblib

    target = Path(path)
    if not target.is_file():
        raise ArtifactError(target, "no such file")
    try:
        payload = joblib.load(target)
    except Exception as exc:
        raise ArtifactError(target, f"cannot unpickle: {type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ArtifactError(target, "not an infer-logger explainer artifact")
    if payload.get("version") != VERSION:
        raise ArtifactError(target, f"artifact version {payload.get('version')}, this reads {VERSION}")
    try:
        return Artifact(payload["method"], dict(payload["options"]), dict(payload["params"]), dict(payload["state"]),
                        list(payload["feature_names"]), tuple(payload.get("categorical") or ()),
                        payload.get("output_names"), dict(payload.get("libraries") or {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(target, f"incomplete artifact: {type(exc).__name__}: {exc}") from exc


def restore_explainer(path: str | Path, model: Model) -> BaseExplainer:
    """The explainer of the artifact at `path`, attached to `model`; errors name the path."""
    artifact = load_artifact(path)
    if list(model.feature_names) != artifact.feature_names:
        raise ArtifactError(path, f"fitted on features {artifact.feature_names}, the model has {model.feature_names}")
    try:
        return artifact.explainer(model)
    except ExplainerError as exc:
        raise ArtifactError(path, str(exc)) from exc


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("shap", "alibi", "numpy", "scikit-learn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
