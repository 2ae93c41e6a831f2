import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler as TVSampler

from maskrcnn.ops.sampler import BalancedPositiveNegativeSampler


def _random_labels(n, p_pos=0.1, p_ignore=0.2, num_classes=5):
    u = torch.rand(n)
    labels = torch.zeros(n, dtype=torch.int64)
    pos = u < p_pos
    labels[pos] = torch.randint(1, num_classes + 1, (int(pos.sum()),))
    labels[(u >= p_pos) & (u < p_pos + p_ignore)] = -1
    return labels


@pytest.mark.parametrize("batch,fraction", [(256, 0.5), (512, 0.25), (64, 0.25), (10, 1.0), (10, 0.0)])
def test_same_subsets_as_torchvision_from_same_rng_state(batch, fraction):
    labels = [_random_labels(n, p) for n, p in [(1000, 0.1), (300, 0.6), (50, 0.0), (0, 0.1), (2000, 0.01)]]
    torch.manual_seed(123)
    tv_pos, tv_neg = TVSampler(batch, fraction)(labels)
    torch.manual_seed(123)
    pos, neg = BalancedPositiveNegativeSampler(batch, fraction)(labels)
    assert len(pos) == len(neg) == len(labels)
    for p, n, tp, tn, lab in zip(pos, neg, tv_pos, tv_neg, labels):
        assert p.dtype == torch.bool and n.dtype == torch.bool
        assert p.shape == lab.shape and n.shape == lab.shape
        assert torch.equal(p, tp.bool()) and torch.equal(n, tn.bool())


@pytest.mark.parametrize(
    "num_pos,num_neg,num_ign", [(500, 500, 100), (10, 1000, 50), (0, 30, 5), (400, 3, 0), (0, 0, 7)]
)
def test_counts_and_membership(num_pos, num_neg, num_ign):
    labels = torch.cat(
        [
            torch.randint(1, 81, (num_pos,)),
            torch.zeros(num_neg, dtype=torch.int64),
            torch.full((num_ign,), -1, dtype=torch.int64),
        ]
    )
    labels = labels[torch.randperm(labels.numel())]
    batch, fraction = 256, 0.25
    (pos,), (neg,) = BalancedPositiveNegativeSampler(batch, fraction)([labels])
    expected_pos = min(num_pos, int(batch * fraction))
    expected_neg = min(num_neg, batch - expected_pos)
    assert int(pos.sum()) == expected_pos
    assert int(neg.sum()) == expected_neg
    assert bool((labels[pos] >= 1).all())
    assert bool((labels[neg] == 0).all())
    assert not bool((pos & neg).any())


def test_never_samples_any_negative_label():
    labels = torch.tensor([-1, -2, -1, -2, 0, 3, -1, 0])
    for _ in range(20):
        (pos,), (neg,) = BalancedPositiveNegativeSampler(8, 0.5)([labels])
        assert not bool((pos | neg)[labels < 0].any())
        assert pos.tolist() == (labels >= 1).tolist()
        assert neg.tolist() == (labels == 0).tolist()


def test_empty_inputs():
    pos, neg = BalancedPositiveNegativeSampler(128, 0.5)([])
    assert pos == [] and neg == []
    (pos,), (neg,) = BalancedPositiveNegativeSampler(128, 0.5)([torch.zeros(0, dtype=torch.int64)])
    assert pos.shape == (0,) and neg.shape == (0,) and pos.dtype == torch.bool


def test_zero_batch_size_samples_nothing():
    (pos,), (neg,) = BalancedPositiveNegativeSampler(0, 0.5)([torch.tensor([1, 0, 2, 0])])
    assert not bool(pos.any()) and not bool(neg.any())


def test_generator_gives_reproducible_draws_independent_of_global_rng():
    labels = [_random_labels(5000, 0.3), _random_labels(4000, 0.2)]
    sampler = BalancedPositiveNegativeSampler(256, 0.5)
    a = sampler(labels, generator=torch.Generator().manual_seed(7))
    torch.rand(10)  # moving the global RNG must not matter
    b = sampler(labels, generator=torch.Generator().manual_seed(7))
    c = sampler(labels, generator=torch.Generator().manual_seed(8))
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x, y)
    assert any(not torch.equal(x, z) for x, z in zip(a[0] + a[1], c[0] + c[1]))


def test_draws_are_uniform():
    labels = torch.tensor([1] * 20 + [0] * 20)
    sampler = BalancedPositiveNegativeSampler(10, 0.5)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(40)
    trials = 400
    for _ in range(trials):
        (pos,), (neg,) = sampler([labels], generator=g)
        counts += (pos | neg).float()
    # Each element is picked with probability 5/20 per draw: 100 expected, sd ~8.7.
    assert bool(((counts - trials * 0.25).abs() < 40).all()), counts


def test_invalid_arguments():
    with pytest.raises(ValueError, match="batch_size_per_image"):
        BalancedPositiveNegativeSampler(-1, 0.5)
    with pytest.raises(ValueError, match="batch_size_per_image"):
        BalancedPositiveNegativeSampler(2.5, 0.5)
    with pytest.raises(ValueError, match="positive_fraction"):
        BalancedPositiveNegativeSampler(256, 1.5)
    sampler = BalancedPositiveNegativeSampler(256, 0.5)
    with pytest.raises(TypeError, match="list"):
        sampler(torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"labels\[0\]"):
        sampler([torch.zeros(2, 5, dtype=torch.int64)])
    with pytest.raises(TypeError, match=r"labels\[1\]"):
        sampler([torch.zeros(5, dtype=torch.int64), torch.zeros(5)])
