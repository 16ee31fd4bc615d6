"""The wire formats batchgen speaks, as pure functions (no I/O), one module per concern.

    types     Reply, APIError, Disposition: what any answer becomes
    faults    the fault table: each error code or phrase, what to do about it and the hint
    models    DashScope's model rules: the route a model is served on, who must stream, who thinks
    stream    the assembler that builds one Reply from the chunks of a streamed answer
    native    DashScope's native API: bodies, routes, replies, errors, its SSE stream
    openai    the OpenAI-compatible API: DashScope's compatible mode, vLLM, Ollama, llama.cpp
    dialect   one Dialect per wire format, bundling the above for the caller and the planner

Facts come from the official SDKs and captured traffic (``shared/dashscope-protocol.md``);
``tests/test_protocol.py`` and ``tests/test_realbodies.py`` hold them to recorded bodies.
"""
