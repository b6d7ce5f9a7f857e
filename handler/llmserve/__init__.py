"""llmserve: a batched LLM engine (config, load, quantize, request, scheduler, kv cache, runner,
sampling, engine, exchange). It knows nothing about TorchServe; handler/llm_handler.py adapts it."""
