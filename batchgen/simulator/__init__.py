"""The DashScope simulator: a local server that speaks the chat protocols over real HTTP."""

from batchgen.simulator.server import (
    COMPATIBLE_PATH,
    DEMO_KEY,
    IMAGE_TOKENS,
    MULTIMODAL_PATH,
    TEXT_PATH,
    SimReply,
    Simulator,
    SimulatorConfig,
    SimulatorStats,
    SimulatorThread,
    TokenBucket,
    count_tokens,
    image_id,
    only_streamed,
    serve_forever,
    simulated_reply,
)

__all__ = [
    "COMPATIBLE_PATH",
    "DEMO_KEY",
    "IMAGE_TOKENS",
    "MULTIMODAL_PATH",
    "TEXT_PATH",
    "SimReply",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStats",
    "SimulatorThread",
    "TokenBucket",
    "count_tokens",
    "image_id",
    "only_streamed",
    "serve_forever",
    "simulated_reply",
]
