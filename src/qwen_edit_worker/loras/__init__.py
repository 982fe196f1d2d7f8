"""Request-time LoRAs (`input.loras`): parsed (request), fetched safely (fetch, hub, safefile),
cached by content (cache), loaded as adapters and switched per job (slots), for the worker
through one object (service.RequestLoras).  Import the modules; this file imports nothing, so
the pure schema can use loras.request without torch."""
