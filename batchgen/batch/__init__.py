"""Batch mode: rows answered through DashScope's OpenAI-compatible Batch API, at half price.

- ``lines``: the request lines batchgen uploads and the three shapes of result line it reads.
"""
