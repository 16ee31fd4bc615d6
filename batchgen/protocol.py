"""Where base URLs and paths of DashScope live until ``config`` takes them (this module goes)."""

from __future__ import annotations

from batchgen.api.models import route_for_model, stream_by_default
from batchgen.api.native import ROUTE_PATHS
from batchgen.api.openai import CHAT_PATH
from batchgen.api.types import Api, Route

COMPATIBLE_PREFIX = "/compatible-mode/v1"  # the OpenAI-compatible API on the same hosts
NATIVE_PREFIX = "/api/v1"

REGION_BASE_URLS: dict[str, str] = {
    "intl": "https://dashscope-intl.aliyuncs.com/api/v1",
    "us": "https://dashscope-us.aliyuncs.com/api/v1",
    "cn": "https://dashscope.aliyuncs.com/api/v1",
    "hk": "https://cn-hongkong.dashscope.aliyuncs.com/api/v1",
}
# Region names as Alibaba Cloud writes them, accepted so DASHSCOPE_API_REGION set for the SDK works.
REGION_ALIASES: dict[str, str] = {
    "ap-southeast-1": "intl",
    "singapore": "intl",
    "us-east-1": "us",
    "virginia": "us",
    "cn-beijing": "cn",
    "beijing": "cn",
    "cn-hongkong": "hk",
    "hongkong": "hk",
}


__all__ = [
    "CHAT_PATH",
    "COMPATIBLE_PREFIX",
    "NATIVE_PREFIX",
    "REGION_ALIASES",
    "REGION_BASE_URLS",
    "ROUTE_PATHS",
    "Api",
    "Route",
    "route_for_model",
    "stream_by_default",
]
