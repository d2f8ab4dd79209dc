"""Front ends: how requests reach the server's core.

    grpc_service.py    the Embedder servicer (Embed, EmbedStream, Tokenize, Info)
    grpc_observing.py  the interceptor every gRPC call passes: request id, span, metrics
    http.py            the OpenAI-compatible HTTP routes
"""
