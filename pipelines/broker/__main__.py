"""`python -m pipelines.broker ...`: the same as `infer-logger broker ...`."""

from pipelines.broker.cli import broker_command

broker_command(prog_name="python -m pipelines.broker")
