import pytest
import torch

from tki_trainer.retrieval import COSINE_EPS, make_keys, retrieve


def brute_force(query, keys, candidates, k):
    """Top-k by cosine over an explicit candidate list, one query at a time."""
    sims = [(float(torch.cosine_similarity(query, keys[j], dim=0)), j) for j in candidates]
    return sorted(sims, reverse=True)[:k]


@pytest.mark.parametrize("num_groups,keys_per_group,key_dim", [(4, 8, 384), (16, 12, 64)])
def test_keys_are_unit_and_orthogonal_within_each_group(num_groups, keys_per_group, key_dim):
    keys = make_keys(num_groups, keys_per_group, key_dim, seed=3)
    assert keys.shape == (num_groups * keys_per_group, key_dim)
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(len(keys)), atol=1e-5, rtol=0)
    for group in keys.view(num_groups, keys_per_group, key_dim):
        torch.testing.assert_close(group @ group.T, torch.eye(keys_per_group), atol=1e-5, rtol=0)
    if num_groups * keys_per_group <= key_dim:
        torch.testing.assert_close(keys @ keys.T, torch.eye(len(keys)), atol=1e-5, rtol=0)
    torch.testing.assert_close(keys, make_keys(num_groups, keys_per_group, key_dim, seed=3))
    assert not torch.allclose(keys, make_keys(num_groups, keys_per_group, key_dim, seed=4))


def test_more_keys_per_group_than_dimensions_is_refused():
    with pytest.raises(ValueError, match="lower keys_per_group"):
        make_keys(2, 9, 8, seed=0)


def test_global_retrieval_matches_brute_force_and_cosine_blend():
    keys = make_keys(3, 4, 16, seed=0)
    queries = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    indices, weights = retrieve(queries, keys, num_groups=3, top_k=2)
    for query, row_indices, row_weights in zip(queries, indices, weights):
        expected = brute_force(query, keys, range(12), 2)
        assert row_indices.tolist() == [j for _, j in expected]
        distances = torch.tensor([max(s, COSINE_EPS) for s, _ in expected])
        torch.testing.assert_close(row_weights, distances / distances.sum())


def test_group_retrieval_stays_inside_the_group():
    keys = make_keys(3, 4, 16, seed=0)
    queries = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    groups = torch.tensor([0, 1, 2, 2, 1, 0])
    indices, _ = retrieve(queries, keys, num_groups=3, top_k=2, group_ids=groups)
    for query, group, row_indices in zip(queries, groups.tolist(), indices):
        expected = brute_force(query, keys, range(4 * group, 4 * group + 4), 2)
        assert row_indices.tolist() == [j for _, j in expected]


def test_softmax_blend_and_best_group_inference():
    keys = make_keys(3, 4, 16, seed=0)
    queries = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    indices, weights = retrieve(queries, keys, num_groups=3, top_k=3, blend="softmax", temperature=0.5)
    sims = torch.nn.functional.normalize(queries, dim=1) @ keys.T
    torch.testing.assert_close(weights, torch.softmax(sims.gather(1, indices) / 0.5, dim=1))

    indices, _ = retrieve(queries, keys, num_groups=3, top_k=2, inference_retrieval="group")
    best_group = sims.argmax(dim=1) // 4
    assert torch.equal(indices // 4, best_group.unsqueeze(1).expand(-1, 2))
