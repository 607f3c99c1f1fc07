"""Sources: where events enter a pipeline (a Kafka consumer group, ...), each feeding a subscriber.

A source's config is data (a pydantic model with a `type` literal); `build(subscriber)` turns
it into a live `Source`. Sources that need an optional client library import it in their
own module, so importing this package needs none.
"""

from pipelines.sources.base import Source, SourceConfig

__all__ = ["Source", "SourceConfig"]
