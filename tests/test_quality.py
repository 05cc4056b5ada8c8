import math

import pytest
import torch
import torch.nn.functional as F

from sparsedeploy.checks.quality import (
    DistributionComparison,
    PerplexityAccumulator,
    evaluate,
    kl_per_position,
    next_token_nll,
    top1_matches,
)


def test_next_token_nll_by_hand():
    # 3 positions, vocab 2. Position t predicts window[t+1].
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]])
    window = torch.tensor([1, 1, 0])
    nll = next_token_nll(logits, window)
    # p(1 | pos 0) = 1/2 ; p(0 | pos 1) = 3/4 ; the last position predicts nothing.
    assert nll.shape == (2,)
    assert nll[0].item() == pytest.approx(math.log(2.0))
    assert nll[1].item() == pytest.approx(-math.log(0.75))


def test_perplexity_is_exp_mean_over_all_predicted_tokens():
    accumulator = PerplexityAccumulator()
    vocab = 7
    accumulator.add(torch.zeros(5, vocab), torch.tensor([0, 1, 2, 3, 4]))  # uniform: nll = log 7 each
    assert accumulator.tokens == 4
    assert accumulator.ppl == pytest.approx(7.0)
    # A second window with certain predictions (nll ~ 0) pulls the mean over all 8 tokens.
    certain = torch.full((5, vocab), -1e4)
    window = torch.tensor([6, 5, 4, 3, 2])
    certain[torch.arange(4), window[1:]] = 1e4
    accumulator.add(certain, window)
    assert accumulator.tokens == 8
    assert accumulator.ppl == pytest.approx(math.exp(4 * math.log(7) / 8))


def test_kl_and_top1_by_hand():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    q = torch.tensor([[0.25, 0.75], [0.9, 0.1]])
    kl = kl_per_position(p.log(), q.log())
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl[0].item() == pytest.approx(expected)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-12)
    assert top1_matches(torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[2.0, 1.0], [3.0, 1.0]])).tolist() == [False, True]


def test_kl_agrees_with_torch_reference_on_random_logits():
    torch.manual_seed(0)
    reference, target = torch.randn(6, 11), torch.randn(6, 11)
    ours = kl_per_position(reference, target)
    theirs = F.kl_div(F.log_softmax(target.double(), -1), F.log_softmax(reference.double(), -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(ours, theirs)


def test_comparison_counts_only_predicting_positions():
    comparison = DistributionComparison()
    logits = torch.randn(4, 5)
    comparison.add(logits, logits)
    assert comparison.positions == 3
    assert comparison.kl_mean == pytest.approx(0.0, abs=1e-12)
    assert comparison.top1_agreement == 1.0


def test_evaluate_streams_windows_and_compares_with_reference():
    torch.manual_seed(0)
    table = torch.randn(16, 16)  # a bigram "model": logits depend on the current token only

    def bigram(window):
        return table[window]

    def noisy(window):
        return table[window] + 0.5 * torch.randn(len(window), 16, generator=torch.Generator().manual_seed(int(window.sum())))

    windows = torch.randint(0, 16, (3, 9))
    alone = evaluate(bigram, windows)
    assert alone.tokens == 3 * 8 and alone.kl_mean is None
    same = evaluate(bigram, windows, reference=bigram)
    assert same.ppl == same.ppl_reference == alone.ppl
    assert same.kl_mean == pytest.approx(0.0, abs=1e-12) and same.top1_agreement == 1.0
    different = evaluate(noisy, windows, reference=bigram)
    assert different.kl_mean > 0 and different.ppl_reference == pytest.approx(alone.ppl)
    assert 0 <= different.top1_agreement <= 1
