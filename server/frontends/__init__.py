"""Front ends: how requests reach the embedding core (server/core.py).

Each maps its wire format to the core's calls and the core's errors to its status codes
(server/errors.py holds the one table); none validates, tokenizes or pools by itself.

    grpc_service.py    the Embedder servicer (Embed, EmbedStream, Tokenize, Info)
    grpc_observing.py  the interceptor every gRPC call passes: request id, span, metrics
    http.py            the OpenAI-compatible HTTP routes
"""
