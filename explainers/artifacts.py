"""Explainer artifacts: what fitting learned, saved with joblib and loaded at start instead of refitting.

An artifact holds the method, its options and default parameters, the fitted state (the
background summary, the anchors' training sample and categories...), the names of the features
and outputs, and the library versions. It never holds the model: that is the live predictor (or
the model file), attached when the artifact is loaded. Artifacts are pickles: load only your own.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from explainers.base import BaseExplainer, Model
from explainers.errors import ArtifactError, ExplainerError, PredictorError
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

    def explainer(self, model: Model, params: Mapping[str, Any] | None = None) -> BaseExplainer:
        """Restored on `model`; `params` (the configured ones) over the artifact's own defaults."""
        explainer = create(self.method, self.options, {**self.params, **(params or {})})
        explainer.restore(model, self.state)
        return explainer


def check_target(path: str | Path) -> None:
    """Before fitting: a path an artifact can be saved at (a file in a directory, made if missing);
    found only when saving, a bad one threw the fitting away."""
    target = Path(path)
    if target.is_dir():
        raise ArtifactError(target, "is a directory: give the artifact's file path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a directory should be, no permission...
        raise ArtifactError(target, f"cannot save here: {type(exc).__name__}: {exc}") from exc


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
    check_target(target)
    # A name of its own in the target's directory (so the rename is atomic): two writers never
    # share one, and open() keeps the umask's permissions (mkstemp's are 0600).
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as file:
            joblib.dump(payload, file)
        os.replace(temporary, target)
    except OSError as exc:
        raise ArtifactError(target, f"cannot save the artifact: {type(exc).__name__}: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)  # left only when saving failed
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
        raise ArtifactError(target, f"artifact version {payload.get('version')!r}, this reads {VERSION}")
    try:
        return Artifact(payload["method"], dict(payload["options"]), dict(payload["params"]), dict(payload["state"]),
                        list(payload["feature_names"]), tuple(payload.get("categorical") or ()),
                        payload.get("output_names"), dict(payload.get("libraries") or {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(target, f"incomplete artifact: {type(exc).__name__}: {exc}") from exc


def restore_explainer(path: str | Path, model: Model) -> BaseExplainer:
    """The explainer of the artifact at `path`, attached to `model`; errors name the path."""
    return restore(load_artifact(path), path, model)


def restore(artifact: Artifact, path: str | Path, model: Model,
            params: Mapping[str, Any] | None = None) -> BaseExplainer:
    """`artifact` (loaded from `path`) attached to `model`, if fitted on its features, with `params`
    over its own (checked beforehand: `ExplainerService.prepare`); errors name the path."""
    if list(model.feature_names) != artifact.feature_names:
        raise ArtifactError(path, f"fitted on features {artifact.feature_names}, the model has {model.feature_names}")
    try:
        return artifact.explainer(model, params)
    except PredictorError:
        raise  # the predictor failed while the engine was built (kernel asks it): not the artifact
    except ExplainerError as exc:
        raise ArtifactError(path, str(exc)) from exc
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        # A state the method cannot build on (keys missing, of another kind): was a traceback.
        raise ArtifactError(path, f"its fitted state does not load: {type(exc).__name__}: {exc}") from exc


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("shap", "alibi", "numpy", "scikit-learn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
