"""Inter-process plumbing: socket names, typed ZMQ queues, shared-memory rings, child bootstrap."""
