"""Losses against a direct, plain-float transcription of the published formulas (not our code)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from capnet.losses import LossConfigError, build_loss, class_aware_weights
from capnet.losses.db_focal import DistributionBalancedLoss
from capnet.registry import LOSSES

# 2 samples x 3 classes; class 0 is the head, class 2 the tail.
LOGITS = [[1.5, -0.5, -2.0], [0.3, 2.0, -1.0]]
TARGETS = [[1, 0, 0], [0, 1, 1]]
FREQ = [60, 25, 4]
TRAIN_NUM = 100


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def reference_db(
    logits, targets, freq, train_num, *, rebalance=True, ntr=True, focal=True, q=0.0,
    divided=True, alpha=0.1, beta=10.0, mu=0.2, lam=5.0, kappa=0.05, gamma=2.0, balance=2.0,
):
    """Wu et al. 2020 (Sec. 3.2-3.3) + the reference code's conventions, element by element."""
    num_c = len(freq)
    raw = [(max(freq) / n) ** q for n in freq]
    cw = [w / (sum(raw) / num_c) for w in raw]  # class-aware weights, mean 1
    total = 0.0
    for k, (zs, ys) in enumerate(zip(logits, targets)):
        # P^C_k = 1/C * sum over positives j of 1/n_j ; P^C_i = 1/C * 1/n_i
        pk = sum((1.0 / num_c) * (1.0 / freq[j]) for j in range(num_c) if ys[j] == 1)
        for i in range(num_c):
            z, y = zs[i], ys[i]
            r = ((1.0 / num_c) * (1.0 / freq[i])) / pk
            r_hat = alpha + sigmoid(beta * (r - mu)) if rebalance else 1.0
            if ntr:
                p = freq[i] / train_num
                b_hat = -math.log(1.0 / p - 1.0)
                shift = kappa * b_hat / (lam if divided else 1.0)
                zz = z + shift  # reference code: cls_score + init_bias
                if y == 1:
                    elem = math.log(1.0 + math.exp(-zz))
                    p_t = sigmoid(zz)
                else:
                    elem = (1.0 / lam) * math.log(1.0 + math.exp(lam * zz))
                    p_t = 1.0 - sigmoid(lam * zz)
            else:
                elem = y * math.log(1.0 + math.exp(-z)) + (1 - y) * math.log(1.0 + math.exp(z))
                p_t = sigmoid(z) if y == 1 else 1.0 - sigmoid(z)
            mod = balance * (1.0 - p_t) ** gamma if focal else 1.0
            total += cw[i] * r_hat * mod * elem
    return total / (len(logits) * num_c)


def make(**options) -> DistributionBalancedLoss:
    return build_loss("db_focal", options, FREQ, TRAIN_NUM)


def run(loss: torch.nn.Module, logits=LOGITS, targets=TARGETS) -> float:
    return float(loss(torch.tensor(logits, dtype=torch.float64), torch.tensor(targets, dtype=torch.float64)))


SWITCHES = list(itertools.product([True, False], [True, False], [True, False], [0.0, 0.5], [True, False]))


@pytest.mark.parametrize("rebalance,ntr,focal,q,divided", SWITCHES)
def test_db_focal_matches_transcription(rebalance, ntr, focal, q, divided):
    loss = make(
        reweight_func="rebalance" if rebalance else "none", use_ntr=ntr, focal=focal,
        class_weight_power=q, bias_divided_by_neg_scale=divided,
    )
    expected = reference_db(LOGITS, TARGETS, FREQ, TRAIN_NUM, rebalance=rebalance, ntr=ntr,
                            focal=focal, q=q, divided=divided)
    assert run(loss) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_bias_variants_differ_by_the_neg_scale_division():
    divided, full = make(bias_divided_by_neg_scale=True), make(bias_divided_by_neg_scale=False)
    assert torch.allclose(divided.ntr_bias * 5.0, full.ntr_bias)
    # tail prior 4/100 -> log-odds log(4/96); kappa=0.05
    assert float(full.ntr_bias[2]) == pytest.approx(0.05 * math.log(4 / 96), rel=1e-6)
    assert run(divided) != pytest.approx(run(full), rel=1e-6)


def test_other_hyperparameters_are_used():
    kw = dict(alpha=0.2, beta=5.0, mu=0.3, lam=2.0, kappa=0.1, gamma=1.0, balance=1.0)
    loss = make(map_alpha=0.2, map_beta=5.0, map_mu=0.3, neg_scale=2.0, init_bias=0.1,
                gamma=1.0, focal_balance=1.0, class_weight_power=1.0)
    assert run(loss) == pytest.approx(reference_db(LOGITS, TARGETS, FREQ, TRAIN_NUM, q=1.0, **kw), rel=1e-10)


def test_focal_is_per_element_not_batch_mean():
    """LMPT averages BCE over the batch before the focal factor; that value must differ from ours."""
    loss = make(reweight_func="none", use_ntr=False, class_weight_power=0.0, focal=True, focal_balance=1.0)
    z, y = torch.tensor(LOGITS, dtype=torch.float64), torch.tensor(TARGETS, dtype=torch.float64)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
    per_element = float(((1 - torch.exp(-bce)) ** 2 * bce).mean())
    batch_mean = float(bce.mean())
    lmpt = (1 - math.exp(-batch_mean)) ** 2 * batch_mean
    assert run(loss) == pytest.approx(per_element, rel=1e-12)
    assert abs(run(loss) - lmpt) > 1e-3


def test_reduces_to_bce_when_everything_is_off():
    loss = make(reweight_func="none", use_ntr=False, focal=False, class_weight_power=0.0)
    z, y = torch.tensor(LOGITS, dtype=torch.float64), torch.tensor(TARGETS, dtype=torch.float64)
    assert run(loss) == pytest.approx(float(torch.nn.functional.binary_cross_entropy_with_logits(z, y)), rel=1e-12)
    assert run(loss) == pytest.approx(run(build_loss("bce", {})), rel=1e-12)


def test_focal_loss_matches_transcription():
    gamma, alpha = 2.0, 0.25
    expected = 0.0
    for zs, ys in zip(LOGITS, TARGETS):
        for z, y in zip(zs, ys):
            p_t = sigmoid(z) if y == 1 else 1 - sigmoid(z)
            a_t = alpha if y == 1 else 1 - alpha
            expected += -a_t * (1 - p_t) ** gamma * math.log(p_t)
    expected /= 6
    assert run(build_loss("focal", {"gamma": gamma, "alpha": alpha})) == pytest.approx(expected, rel=1e-10)
    assert run(build_loss("focal", {"gamma": 0.0})) == pytest.approx(run(build_loss("bce", {})), rel=1e-12)


def test_class_aware_weights_formula():
    w = class_aware_weights([100, 25, 4], 0.5)
    raw = [1.0, 2.0, 5.0]
    assert w.tolist() == pytest.approx([r / (8 / 3) for r in raw], rel=1e-6)
    assert float(w.mean()) == pytest.approx(1.0)
    assert torch.allclose(class_aware_weights([100, 25, 4], 0.0), torch.ones(3, dtype=torch.float64))


def test_sample_without_positives_gets_alpha_plus_one():
    loss = make(use_ntr=False, focal=False, class_weight_power=0.0)
    weight = loss.rebalance_weight(torch.zeros(1, 3, dtype=torch.float64))
    assert torch.allclose(weight, torch.full((1, 3), 1.1, dtype=torch.float64))
    value = run(loss, logits=[[0.1, 0.2, 0.3]], targets=[[0, 0, 0]])
    assert math.isfinite(value)


def test_input_logits_are_not_modified_in_place():
    z = torch.tensor(LOGITS)
    before = z.clone()
    make()(z, torch.tensor(TARGETS, dtype=torch.float32))
    assert torch.equal(z, before)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_builds_and_has_finite_gradients(name):
    loss = build_loss(name, {}, class_freq=FREQ, train_num=TRAIN_NUM)
    z = torch.tensor(LOGITS, requires_grad=True)
    value = loss(z, torch.tensor(TARGETS, dtype=torch.float32))
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    big = torch.tensor([[80.0, -80.0, 60.0], [-70.0, 90.0, -50.0]], requires_grad=True)
    loss(big, torch.tensor(TARGETS, dtype=torch.float32)).backward()
    assert torch.isfinite(big.grad).all()


def test_unknown_option_names_loss_and_valid_options():
    with pytest.raises(LossConfigError, match=r"loss 'db_focal'.*'gama'.*did you mean 'gamma'.*valid options:.*neg_scale"):
        build_loss("db_focal", {"gama": 2}, FREQ, TRAIN_NUM)
    with pytest.raises(LossConfigError, match="loss 'bce'.*class_freq"):
        build_loss("bce", {"class_freq": [1]})


def test_missing_class_statistics_is_a_clear_error():
    with pytest.raises(LossConfigError, match="db_focal.*class_freq"):
        build_loss("db_focal", {})


def test_bad_shapes_and_counts_are_rejected():
    with pytest.raises(ValueError, match="db_focal.*3 classes"):
        make()(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="class 1 has 500"):
        build_loss("db_focal", {}, [5, 500], 100)
    with pytest.warns(UserWarning, match="class 1 has 0"):
        build_loss("db_focal", {}, [5, 0], 100)


def test_classes_without_positives_are_named_in_one_warning():
    import warnings

    names = [f"c{i}" for i in range(80)]
    freq = [0] * 79 + [88]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_loss("db_focal", {}, freq, 88, class_names=names)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "79 classes (c0, c1," in message and "c78) have 0 of 88 training positives" in message
    assert "class c79 has 88 of 88 training positives (counted as 87)" in message
