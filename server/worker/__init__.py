"""Device workers: one process per device slot, and the main process's handle on it.

    handle.py       WorkerHandle: spawn, supervise and restart a worker; its batches
    channel.py      the event loop's end of a worker's socket
    spec.py         what crosses the process boundary: WorkerSpec, Batch
    process.py      the worker process's entry point
    backends.py     OrtBackend (ONNX Runtime + IOBinding), FakeBackend
    cuda.py         session and CUDA provider settings
    cuda_graphs.py  static shapes and CUDA graphs for short batches

Nothing here imports the front ends, the router or grpc.
"""
