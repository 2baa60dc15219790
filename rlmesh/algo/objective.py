"""The policy's whole training objective: policy-gradient loss, entropy bonus and KL loss, aggregated alike."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from rlmesh.algo.kl import kl_loss
from rlmesh.algo.losses import PolicyLoss, agg_loss, get_policy_loss
from rlmesh.algo.masked import masked_mean

__all__ = ["PolicyObjective", "policy_objective"]


class PolicyObjective(NamedTuple):
    loss: Tensor  # what backward runs on
    loss_terms: dict[str, Tensor]  # detached parts reported as losses: pg_loss, and kl_loss when a reference is given
    token_means: dict[str, Tensor]  # detached means over the valid tokens: the policy loss's metrics, entropy


def policy_objective(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    entropy: Tensor | None = None,
    ref_log_prob: Tensor | None = None,
    token_weights: Tensor | None = None,
    policy_loss: str | PolicyLoss = "vanilla",
    loss_agg_mode: str = "token-mean",
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    clip_ratio_c: float | None = 3.0,
    entropy_coeff: float = 0.0,
    kl_loss_coef: float = 0.0,
    kl_loss_type: str = "low_var_kl",
    norm_constant: float | None = None,
    denominator: float | Tensor | None = None,
) -> PolicyObjective:
    """The loss the policy trainer minimises on one (micro-)batch; every per-token input is [B, T].

        loss = PG - entropy_coeff * H + kl_loss_coef * KL

        PG = agg(l)                          l_it: the per-token loss of `policy_loss` (PPO clip, GSPO: losses.py)
        H  = agg(entropy)                    the entropy bonus; left out of the loss when entropy_coeff is 0
        KL = agg(k(log_prob, ref_log_prob))  k: the kl_loss_type estimator (kl.py); only when ref_log_prob is given

    All three share one aggregation, agg(x) = agg_loss(x, m, loss_agg_mode, C, denominator=D), with m the response
    mask and L_i = sum_t m_it:

        token-mean               sum_it m_it x_it / D
        seq-mean-token-sum       sum_i sum_t m_it x_it / D
        seq-mean-token-mean      sum_i (sum_t m_it x_it / L_i) / D
        seq-mean-token-sum-norm  sum_i sum_t m_it x_it / (C * D)     Dr.GRPO

    C is norm_constant, by default T, the padded response width (the longest response, unless the batch was padded
    to a fixed width). D is the accumulation denominator: the number of valid tokens (token-mean) or of non-empty
    sequences (the seq modes). None counts this batch's own, which gives the loss of exactly these tensors. A
    trainer that accumulates gradients passes, on each of its W ranks, the count over the whole mini-batch of all
    ranks divided by W: a rank's micro-batch losses then add up to W times its share of the mini-batch loss, and
    DDP's average of the ranks' gradients is the gradient of the whole mini-batch's loss.

    token_weights (the rollout correction's importance weights, >= 0) multiply each token's policy loss l_it. They
    enter as advantages w_it * A_it: every registered loss is positively homogeneous in A (l(w A) = w l(A) for
    w >= 0, clip decisions included), so this is exact, and a custom loss must be too to take weights.

    Gradient flows through log_prob and entropy only; masked positions reach nothing, whatever they hold.
    """
    if entropy is None and entropy_coeff != 0:
        raise ValueError(f"entropy_coeff={entropy_coeff} needs the entropy; pass entropy=, or set entropy_coeff=0")
    loss_fn = get_policy_loss(policy_loss) if isinstance(policy_loss, str) else policy_loss
    norm_constant = norm_constant or float(response_mask.shape[-1])
    if token_weights is not None:
        advantages = advantages * token_weights.detach()
    pg_loss, pg_metrics = loss_fn(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode=loss_agg_mode,
        clip_ratio=clip_ratio,
        clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high,
        clip_ratio_c=clip_ratio_c,
        norm_constant=norm_constant,
        denominator=denominator,
    )
    loss = pg_loss
    loss_terms = {"pg_loss": pg_loss.detach()}
    if entropy_coeff != 0:
        assert entropy is not None
        bonus = agg_loss(entropy, response_mask, loss_agg_mode, norm_constant, denominator=denominator)
        loss = loss - entropy_coeff * bonus
    if ref_log_prob is not None:
        kl_term = kl_loss(
            log_prob, ref_log_prob, response_mask, kl_loss_type, loss_agg_mode, norm_constant, denominator=denominator
        )
        loss = loss + kl_loss_coef * kl_term
        loss_terms["kl_loss"] = kl_term.detach()
    token_means = dict(pg_metrics)
    if entropy is not None:
        token_means["entropy"] = masked_mean(entropy.detach(), response_mask)
    return PolicyObjective(loss, loss_terms, token_means)
