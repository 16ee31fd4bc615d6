"""The DashScope simulator: a local server that speaks the chat protocols over real HTTP."""

from batchgen.simulator.config import DEMO_KEY, SimulatorConfig, SimulatorStats
from batchgen.simulator.images import IMAGE_TOKENS, image_id
from batchgen.simulator.models import only_streamed
from batchgen.simulator.quota import TokenBucket
from batchgen.simulator.replies import SimReply, simulated_reply
from batchgen.simulator.server import COMPATIBLE_PATH, MULTIMODAL_PATH, TEXT_PATH, Simulator
from batchgen.simulator.text import count_tokens
from batchgen.simulator.thread import SimulatorThread, serve_forever

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
