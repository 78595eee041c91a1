"""The closed loop: re-predict the rest of a run from its current state, during training.

The open-loop prediction linearises the network once, at the fit-start weights w0. When
fine-tuning moves the features, the empirical NTK drifts and the real run leaves its
linearisation (faster or slower). At a few steps k of the run (geometric: 2, 5, 10, 20,
40 % of T; :func:`checkpoint_steps`) the closed loop

1. re-estimates the empirical NTK Θ^{(k)} at the current weights w_k on the *same* kernel
   subset (:func:`lightning_ttp.api.estimate_kernel`, eval mode), and the outputs f_k; a
   model with BatchNorm in train mode on the subset as one training batch instead
   (:func:`batch_statistics_state`: the batched train-mode Jacobian, as training sees it);
2. measures the drift against the fit-start kernel Θ^{(0)}: the scale
   s_k = Σ_g η_g tr Θ_g^{(k)} / Σ_g η_g tr Θ_g^{(0)} and the centred kernel-target alignment
   A(K) = ⟨K_c, (YYᵀ)_c⟩_F / (‖K_c‖_F ‖(YYᵀ)_c‖_F), K_c = HKH, H = I − 11ᵀ/N
   (Cortes et al. 2012), with K the per-sample kernel Σ_c Θ_{(i,c),(j,c)};
3. carries the optimiser state into function space: the image of the momentum buffer
   B_g = J_g^{(k)} b_g (SGD), or of Adam's preconditioned first moment
   B_g = J_g^{(k)} P_k m_g with P_k = diag(1/(√v̂_k + ε)) from the optimiser's own second
   moment (the kernel is then J P_k Jᵀ), each by one ``torch.func.jvp``;
4. simulates the remaining steps k..T in function space from f_k
   (:func:`lightning_ttp.dynamics.simulate_discrete`, buffers and Adam's step count carried;
   the expected gradient, or Monte Carlo mini-batch paths with ``num_paths`` ≥ 1), with the
   kernel's top eigenvalues clipped at the stability limit of the remaining lrs when the
   linearisation would diverge (the real network self-stabilises at the edge of stability)
   and, optionally, the lrs multiplied by the extrapolated kernel scale m(t) = ŝ(t)/ŝ(k),
   ŝ(t) = α + β log(1 + t) fitted to (0, 1), (k_j, s_{k_j})
   (scaling Θ by m is scaling η by m), m clipped to [1/``max_drift``, ``max_drift``];
5. joins the simulated curve S_τ (τ = t − k) to the observed prefix multiplicatively at the
   observed level ℓ_k (the first call: a straight line through the last observed losses,
   evaluated at k; later calls: the previous call's curve, warped as in 6, moved by the mean of
   the losses observed since it):
   L̂_t = ℓ_k S_{t−k}/S_0 for t ≥ k, the smoothed observed losses before k;
6. calibrates the speed: from the second call on, the previous call's curve is fitted to the
   losses observed since its step with :func:`lightning_ttp.pipeline.refine.refine_curve` (time warp
   a, log a ~ N(0, 1), evidence gate 1) and the new continuation is warped,
   L̂_{k+τ} ← L̂_{k+aτ}: how much faster (a > 1) or slower the real run went than its last
   linearisation;
7. with ``blend=True`` (off by default: it did not help through the callback on
   ``benchmarks/defaults.py``), blends the result R with the power law P fitted to the observed
   prefix after step k, L̂ = w R + (1 − w) P, w = e_P/(e_R + e_P) from the previous call's
   out-of-sample mean squared log errors on the losses observed since it (once ≥ 10 % of T lies
   between them).

For a model that is linear in its parameters steps 1–4 are exact: the continuation equals
real ``torch.optim.SGD`` training from step k, momentum included (tests check it step by
step), steps 5–6 change nothing and step 7 (when on) gives the exact curve a weight near 1. Adam's
second moment is held at its value at step k (an approximation).

The modules, by job: :mod:`~lightning_ttp.pipeline.closed_loop.state` (steps 1 and 3),
:mod:`~lightning_ttp.pipeline.closed_loop.drift` (2), :mod:`~lightning_ttp.pipeline.closed_loop.continuation`
(4), :mod:`~lightning_ttp.pipeline.closed_loop.blend` (5–7), and
:mod:`~lightning_ttp.pipeline.closed_loop.loop`, which runs them in order
(:func:`relinearised_prediction`, :class:`ClosedLoop`). Pure torch/numpy/scipy: no Lightning.
"""

from __future__ import annotations

from .continuation import continuation_batches
from .drift import KernelDrift, centred_alignment, kernel_drift
from .live import LivePrediction
from .loop import DEFAULT_FRACTIONS, ClosedLoop, checkpoint_steps, relinearised_prediction

__all__ = [
    "DEFAULT_FRACTIONS",
    "ClosedLoop",
    "KernelDrift",
    "LivePrediction",
    "centred_alignment",
    "checkpoint_steps",
    "continuation_batches",
    "kernel_drift",
    "relinearised_prediction",
]
