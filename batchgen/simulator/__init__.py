"""A local DashScope server that speaks the chat protocols over real HTTP.

The end-to-end tests, the README demo and the benchmarks need a DashScope that is free,
offline, fast and misbehaves on demand. A transport-level fake would only test what its author
believed about the protocol; a real server on loopback makes the client go through its actual
connection pool, timeouts, retries, JSON and event-stream parsing. So this package answers
exactly what the real service answers (routes, JSON shapes, error codes and messages, the
``x-request-id`` header), and adds, on top, what the real service does only on a bad day:
throttling, 5xx, dropped connections, truncated bodies and cut streams, hangs and HTTP 200
business errors.

Three routes, each counted in :attr:`SimulatorStats.routes`:

- ``text`` (:data:`TEXT_PATH`) and ``multimodal`` (:data:`MULTIMODAL_PATH`), the native
  protocol. Each model answers on its own route only ("url error" otherwise). With the header
  ``X-DashScope-SSE: enable`` the answer is an event stream (``id:``/``event:``/
  ``:HTTP_STATUS/``/``data:`` events, no ``[DONE]``), and every error of that request arrives
  as one ``event:error`` under HTTP 200, as the real gateway does it (the HTTP 200 business
  error of ``fault_200_error`` too: its event says ``:HTTP_STATUS/500``). The multimodal route
  takes images (http(s) URLs, never fetched, or ``data:image/...;base64`` URIs), each billed
  :data:`IMAGE_TOKENS` input tokens and named in the reply by :func:`image_id`.
- ``openai`` (:data:`COMPATIBLE_PATH`, at the host root, not under ``/api/v1``): the
  OpenAI-compatible chat completions, for any model, with OpenAI's body, reply, chunk and
  error shapes (see ``errors._OPENAI_ERRORS`` for how native errors map onto it).

Both protocols share the key check, the quotas, the faults, the latency, the models, the
validation rules, the test markers, ``response_format`` (JSON object or JSON schema replies)
and the models that answer only streamed calls (:func:`only_streamed`).

Beside the chat routes, the OpenAI-compatible **Files and Batch API** (:data:`FILES_PATH`,
:data:`BATCHES_PATH`, counted as the routes "files" and "batches"): upload a JSONL file, create
a batch, poll it, cancel it, download its output and error files, list batches with their
filters. A batch lives on a simulated clock, the simulator's ``clock`` times
``SimulatorConfig.batch_speed``, and its state is computed from that time on each call, so a
test advances a fake clock instead of sleeping, and a demo with a large speed finishes in
seconds. Each line is answered exactly as the compatible chat route answers its body; the
account's limits (:class:`BatchLimits`) and the batch faults (429s, lost create answers,
lines failing with 500) are the Batch API's own, and :class:`BatchStats` records what ran.

Replies are a pure function of the request (:func:`simulated_reply`), so a test can compute the
answer it expects, and a resumed run must reproduce byte-identical results; a streamed answer
joins up to exactly the non-streamed one. Only the fault and latency draws are random, from
their own seeded RNG.

Usage from async code::

    sim = Simulator(SimulatorConfig(fault_500=0.1))
    base_url = await sim.start()
    ...
    await sim.stop()

and from sync code (tests, ``batchgen run --simulate``)::

    with SimulatorThread(SimulatorConfig(rpm=600)) as sim:
        run_things_against(sim.base_url)  # sim.compatible_base_url for the OpenAI route

The modules, each building on those before it in this list:

- ``config``: :class:`SimulatorConfig`, :class:`SimulatorStats`, :class:`BatchLimits`,
  :class:`BatchStats`, the fault names, :data:`DEMO_KEY`.
- ``text``: :func:`count_tokens`, cutting at a token limit, and the deterministic prose of replies.
- ``images``: which image values the service takes, :data:`IMAGE_TOKENS` and :func:`image_id`.
- ``jsonreplies``: the JSON schemas the simulator can answer, and a document valid against one.
- ``models``: which models exist, which route serves them, which think, :func:`only_streamed`.
- ``replies``: :class:`SimReply` and :func:`simulated_reply`, the reply to a request.
- ``streaming``: a reply cut into the deltas of an event stream, with the usage up to each.
- ``quota``: :class:`TokenBucket`, the requests and tokens per minute quotas.
- ``errors``: the service's error messages, the test markers, the OpenAI wording of each error.
- ``validation``: request bodies checked in the service's order, on either protocol.
- ``wire``: the JSON bodies and stream events of answers and errors, for either protocol.
- ``files``: the account's file storage, its ids and limits, and reading a multipart upload.
- ``batchlines``: a batch input file validated (the error codes), and each line answered.
- ``batchstate``: a batch's life on the simulated clock, its object and its result files.
- ``batches``: :class:`BatchService`, the Files and Batch API's routes, errors and limits.
- ``server``: :class:`Simulator`, the aiohttp server: routes, key, quotas, faults, latency.
- ``thread``: :class:`SimulatorThread` for sync callers and :func:`serve_forever` for the CLI.
"""

from batchgen.simulator.batches import BATCHES_PATH, FILES_PATH, BatchService
from batchgen.simulator.config import DEMO_KEY, BatchLimits, BatchStats, SimulatorConfig, SimulatorStats
from batchgen.simulator.images import IMAGE_TOKENS, image_id
from batchgen.simulator.models import only_streamed
from batchgen.simulator.quota import TokenBucket
from batchgen.simulator.replies import SimReply, simulated_reply
from batchgen.simulator.server import COMPATIBLE_PATH, MULTIMODAL_PATH, TEXT_PATH, Simulator
from batchgen.simulator.text import count_tokens
from batchgen.simulator.thread import SimulatorThread, serve_forever

__all__ = [
    "BATCHES_PATH",
    "COMPATIBLE_PATH",
    "DEMO_KEY",
    "FILES_PATH",
    "IMAGE_TOKENS",
    "MULTIMODAL_PATH",
    "TEXT_PATH",
    "BatchLimits",
    "BatchService",
    "BatchStats",
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
