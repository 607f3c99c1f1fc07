"""`python -m explainers`: the same as `infer-logger explainer`."""

from explainers.cli import explainer_command

if __name__ == "__main__":
    explainer_command()
