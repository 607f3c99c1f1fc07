"""CloudEvents 1.0 for infer-logger: the event, its validation, the JSON format, and the HTTP
and Kafka bindings. Pure functions throughout; no CloudEvents SDK or transport client.
"""

from infer_logger.cloudevents.event import SPECVERSION, AttributeValue, CloudEvent, attribute_text
from infer_logger.cloudevents.http import (
    content_mode,
    decode_header_value,
    encode_header_value,
    from_http,
    from_http_many,
    to_batch,
    to_batches,
    to_binary,
    to_structured,
)
from infer_logger.cloudevents.json_format import (
    BATCH_MEDIA_TYPE,
    EVENT_MEDIA_TYPE,
    from_dict,
    from_json,
    from_json_batch,
    to_dict,
    to_json,
    to_json_batch,
    to_json_batches,
)
from infer_logger.cloudevents.kafka import (
    KafkaMessage,
    Key,
    KeyChooser,
    from_kafka,
    key_by_id,
    to_kafka_binary,
    to_kafka_structured,
)
from infer_logger.cloudevents.validation import (
    check_uri_reference,
    is_media_type,
    is_string,
    parse_time,
    percent_escaped,
    validate,
)

__all__ = [
    "BATCH_MEDIA_TYPE",
    "EVENT_MEDIA_TYPE",
    "SPECVERSION",
    "AttributeValue",
    "CloudEvent",
    "KafkaMessage",
    "Key",
    "KeyChooser",
    "attribute_text",
    "check_uri_reference",
    "content_mode",
    "decode_header_value",
    "encode_header_value",
    "from_dict",
    "from_http",
    "from_http_many",
    "from_json",
    "from_json_batch",
    "from_kafka",
    "is_media_type",
    "is_string",
    "percent_escaped",
    "key_by_id",
    "parse_time",
    "to_batch",
    "to_batches",
    "to_binary",
    "to_dict",
    "to_json",
    "to_json_batch",
    "to_json_batches",
    "to_kafka_binary",
    "to_kafka_structured",
    "to_structured",
    "validate",
]
