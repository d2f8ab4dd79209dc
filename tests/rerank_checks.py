"""Served reranker scores against a reference the model card's procedure made (the test
modules of the Reranker service share these)."""

from __future__ import annotations

from typing import Any

import numpy as np

from embedrpc.v1 import embedder_pb2 as pb

from . import qwen3_fixtures as fx

# fp32 through the server: max |score difference| to the card's transformers code.
FP32_BOUND = 1e-4


def by_index(response: pb.RerankResponse, count: int) -> np.ndarray:
    """A response's scores put back in document order (every index once)."""
    scores = np.full(count, np.nan)
    for result in response.results:
        assert np.isnan(scores[result.index]), f"index {result.index} twice"
        scores[result.index] = result.score
    assert not np.isnan(scores).any(), "a document has no result"
    return scores


def check_ranked(response: pb.RerankResponse) -> None:
    """Results are best first, ties in input order."""
    keys = [(-r.score, r.index) for r in response.results]
    assert keys == sorted(keys), keys


def rerank_case(stub: Any, case: dict[str, Any], **request: Any
                ) -> tuple[np.ndarray, np.ndarray, list[pb.RerankResponse]]:
    """Every group of a reference case through Rerank → (got, want, responses); the
    responses are checked for order and for the card's token counts and cuts."""
    got, want, responses = [], [], []
    for group in case["groups"]:
        response = stub.Rerank(pb.RerankRequest(
            query=group["query"], documents=group["documents"],
            instruction=case["instruction"] or "", **request), timeout=60)
        check_ranked(response)
        assert response.usage.prompt_tokens == sum(map(len, group["token_ids"]))
        assert response.usage.truncated_inputs == sum(group["truncated"])
        got.append(by_index(response, len(group["documents"])))
        want.append(group["scores"])
        responses.append(response)
    return np.concatenate(got), np.concatenate(want), responses


def assert_scores_match(got: np.ndarray, want: np.ndarray, groups: list[dict[str, Any]],
                        bound: float = FP32_BOUND) -> None:
    """Within `bound` of the reference, and each query's ranking the reference's (scores
    closer than `bound` are ties)."""
    worst = float(np.abs(got - np.asarray(want)).max())
    assert worst <= bound, f"max |score difference| {worst:.2e} > {bound:g}"
    assert fx.ranking_swaps(got, want, groups, bound) == []
