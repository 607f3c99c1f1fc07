"""A demo predictor and the quickstart (the `demo` extra: scikit-learn). The sidecar never imports it."""
