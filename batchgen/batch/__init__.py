"""Batch mode: rows answered through DashScope's OpenAI-compatible Batch API, at half price.

- ``lines``: the request lines batchgen uploads, the three shapes of result line it reads, the
  result of a row no line answers, and the file a chunk is written to within the limits;
- ``remote``: the Files and Batch API calls, retried; lost answers looked up, never resent blindly;
- ``store``: the journal's batch tables (which rows are in which file and batch, and how far each got);
- ``mode``: one run's pass: settle, collect, submit, wait; and what the output says of each row.
"""
