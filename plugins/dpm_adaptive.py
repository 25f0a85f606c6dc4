"""Adaptive DPM-Solver: error-controlled step sizes in the log-SNR (Lu et al. 2022a,
"DPM-Solver", NeurIPS, Sec. 3.3 and App. C, Alg. 4 "DPM-Solver-12" / "DPM-Solver-23"),
and, with ``method = "multistep"``, the same error control over DPM-Solver++ 3M / 2M
multistep updates (:func:`multistep_pair`; one evaluation per accepted step, none per
rejected trial; the registry's ``dpm_adaptive_ms``), or with ``order = 4`` over 4M / 3M
(:func:`multistep_pair4`: the data prediction's cubic interpolant in ``lambda``).

Each step from ``lambda_s`` to ``lambda_t = lambda_s + h`` (``lambda = log(a / s)``)
computes a lower- and a higher-order exponential-integrator solution that share their
score evaluations: orders 1 and 2 (``order = 2``: the data prediction at ``s`` and at
``lambda_s + h / 2``), or 2 and 3 (``order = 3``: at ``s``, ``+ h / 3`` and ``+ 2h / 3``).
Both are written in the data prediction, DPM-Solver++ (Lu et al. 2022b, singlestep
updates), through the kernel, so every SDE with a Gaussian kernel works. The local error
estimate is the RMS over coordinates of ``(x_high - x_low) / delta``; the step is
accepted when it is at most 1 (the state moves to ``x_high``) and the next ``h`` is
``theta * h * E^(-1/order)``, grown by at most ``facmax`` after an accepted step and not
at all after a rejected one (Hairer, Norsett & Wanner, "Solving ODEs I", Sec. II.4).
Departures from the reference, each chosen on the sampling suite's selection beds
(``benchmarks/sampling_suite.py``, docs/benchmarks-suite.md) and checked on its held-out
ones:

* ``tolerance = "noise"`` (default): ``delta = ntol * s_t``, the kernel's noise std at
  the step's end. An error small against the noise still to come is harmless, and this
  holds at any data scale and for every SDE. The reference's ``"state"`` tolerance,
  ``delta = max(atol * scale, rtol * max(|x_low|, |x_prev|))`` (``scale``: the RMS of the
  first data prediction), lets a step err by 5 % of ``|x|``, which is more than a mode's
  width on narrow or small-scale data (VE on the narrow ring: 38x the floor; VP on data
  of std 0.05: 100x, in 7 evaluations).
* the reference's growth of ``h`` is unbounded, so after a cheap early step it tries a
  step of the whole log-SNR range and is rejected, every other trial; ``facmax = 3``.
* ``h_init = 0.3`` and ``eps = 1e-4`` (data of std 0.05 have modes narrower than the VP
  kernel's noise at ``t = 1e-3``). ``sigma_end`` stops at a noise level instead, the
  same for every SDE: the registry's ``dpm_adaptive_ms`` ends at ``sigma_end = 3e-3``
  (at the same ``eps = 1e-5`` sub-VP's ``s / a`` is ``1e-6`` where VP's is ``1e-3``:
  sub-VP spent a third more evaluations below any mode's width).
* ``tolerance = "width"``: ``delta = ntol * s_t * W``, ``W`` the width of ``p_t``'s
  modes over the noise std at the step's start, read off the predicted noise
  (:meth:`DPMAdaptive._width`): ``ntol * s_t`` while the noise is wider than the modes,
  about ``ntol`` times the modes' own width below. On batches of fewer than
  ``WIDTH_MIN_NUMBERS`` numbers ``W = 1`` (the noise tolerance): one sample's predicted
  noise in two dimensions says little about the modes' width.
* ``tolerance = "data_width"`` (the registry's ``dpm_adaptive_ms``): ``delta = ntol * a *
  max(w_t, noise_share * sigma)``, ``w_t = sigma sqrt(W^2 - 1)`` the data's own mode
  width as the predictions read it (``p_t``'s less the noise). Before the modes separate
  ``w_t`` is the spread a sample may still land anywhere in, and an error there reaches
  the sample as that spread's share of the noise; so the early steps are held to
  ``noise_share * ntol * sigma``, and the steps below the modes' width to ``ntol * w``
  (the width rule's ``ntol * sigma`` early let the narrow ring's centres err by 1.5 % of
  a mode's std).
* ``norm = "rms"`` (default) combines the per-sample errors by their root mean square
  over the batch, the error of the distribution the solver is after; ``"max"`` (the
  reference) lets a single outlying sample of a large batch shrink every step.

``nfe`` is a cap, not a target: when what is left would not pay for another trial step
and the start of the next, the solver takes its last step to ``eps`` with what it can
afford (the higher order, or DDIM when no evaluation is left). The multistep method,
whose steps cost one evaluation each, instead spreads what is left evenly in log-SNR
once, in the cap's second half, steps of the controller's size (or of the run's mean
step so far, if larger) would not reach ``eps`` on what is left: one leap to ``eps``
made garbage (std error 20 at ``nfe = 20`` on the ring; now 0.05, DPM-Solver++'s).
A cap under twice the run's need may spread where the run would have fitted (on
``scale-large``, needing 38, a cap of 40 doubles the std error). Either way it warns
that those steps are not held to the tolerance. Score evaluations are
counted by the engine; the final denoising step (``denoise``) is one more.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from pydantic import Field, model_validator

from diffuse_engine import DiffuseError, hookimpl
from diffuse_engine.components.kernel_solver import KernelGrid, KernelSolver, KernelSolverConfig
from diffuse_engine.components.schedules import log_snr, time_from_log_snr

#: the fewest numbers (batch x dims) the width tolerance reads the modes' width from:
#: the RMS of N standard normals has relative std about 1 / sqrt(2N), 4 % at 256, and
#: a single 2-D sample's predicted noise put W between 7 and 69 where it is 1 to 30
WIDTH_MIN_NUMBERS = 256


class DPMAdaptiveConfig(KernelSolverConfig):
    method: Literal["singlestep", "multistep"] = Field(
        "singlestep",
        description="singlestep: DPM-Solver-12/23 (Lu et al. 2022a, Alg. 4); multistep: "
        "DPM-Solver++ 2M/3M on adaptive steps, one evaluation per accepted step",
    )
    order: Literal[2, 3, 4] = Field(
        3, description="higher order of the embedded pair (2: 1/2, 3: 2/3; multistep 4: 3M/4M)"
    )
    tolerance: Literal["noise", "width", "data_width", "state"] = Field(
        "noise",
        description="noise: each step's error at most ntol times the kernel's noise std at "
        "its end; width: ntol times the width of p_t's modes (the noise std over the RMS "
        "of the predicted noise, never below the noise std); data_width: ntol times the "
        "larger of the data's mode width as the predictions read it and noise_share "
        "times the noise std; state (the reference): max(atol * scale, rtol * |x|)",
    )
    ntol: float = Field(
        0.1,
        gt=0,
        description="tolerance = noise, width or data_width: error over noise std or width",
    )
    noise_share: float = Field(
        0.3,
        gt=0,
        le=1,
        description="tolerance = data_width: the noise std's weight against the width",
    )
    rtol: float = Field(0.05, gt=0, description="tolerance = state: relative tolerance")
    atol: float = Field(
        0.01, gt=0, description="tolerance = state: absolute, in units of the data scale"
    )
    h_init: float = Field(0.3, gt=0, description="first step in log-SNR")
    theta: float = Field(0.9, gt=0, lt=1, description="safety factor of the step-size update")
    facmax: float | None = Field(
        3.0, gt=1, description="largest growth of h per accepted step (none: unbounded)"
    )
    norm: Literal["rms", "max"] = Field("rms", description="per-sample errors: rms or max")
    eps: float | None = Field(
        1e-4, gt=0, lt=1, description="smallest time (none: the SDE's sampling_eps)"
    )
    max_trials: int = Field(10_000, ge=1, description="most trial steps before giving up")

    def budget(self, nfe: int) -> dict:
        """``nfe`` caps the evaluations (the error control picks the steps); a
        one-evaluation budget drops the denoising step, as for every solver."""
        super().budget(nfe)  # refuses times
        return {"denoise": False} if nfe < 2 else {}

    @model_validator(mode="after")
    def _order_fits_the_method(self):
        if self.order == 4 and self.method != "multistep":
            raise ValueError(
                'order = 4 (the 3M / 4M pair) needs method = "multistep"; the singlestep '
                "pairs are orders 2 (1/2) and 3 (2/3)"
            )
        return self

    @model_validator(mode="after")
    def _own_steps(self):
        default = type(self).model_fields["steps"].default  # what a config's dump holds
        if "steps" in self.model_fields_set and self.steps != default:
            raise ValueError(
                f"steps ({self.steps}) does not apply: the adaptive solver's error control "
                "picks its own steps; leave steps out (nfe = N caps the evaluations)"
            )
        if self.schedule != "logsnr" or self.times is not None:
            raise ValueError(
                "the adaptive solver picks its own times in log-SNR: leave "
                'schedule = "logsnr" and no times'
            )
        return self


def _phi4(h: float) -> float:
    """``(e^-h - 1 + h - h^2/2 + h^3/6) / h^3``, the weight of ``h^3`` times the third
    derivative (its series below ``h = 0.02``, where the closed form cancels)."""
    if h < 0.02:
        return h / 24 - h**2 / 120 + h**3 / 720 - h**4 / 5040
    return (math.expm1(-h) + h - h * h / 2 + h**3 / 6) / h**3


def multistep_pair4(x, hist, s_s: float, a_t: float, s_t: float, h: float):
    """``(x_low, x_high)``: DPM-Solver++ 3M and 4M from the last four ``(lambda, data
    prediction)`` pairs: the data prediction's cubic interpolant in ``lambda`` (in
    units of ``h``, ``p(r) = c0 + c1 r + c2 r^2 + c3 r^3``) integrated exactly against
    the exponential weight: ``x_t = (s_t/s_s) x - a_t phi_1 c0 + a_t phi_2 c1 - 2 a_t
    phi_3 c2 + 6 a_t phi_4 c3``. This is the exponential Adams method of order 4
    (Hochbruck & Ostermann 2010, "Exponential integrators", Acta Numerica, Sec. 2.4)
    on DPM-Solver++'s data-prediction ODE; Lu et al. (2022b) stop at 3M."""
    low = multistep_pair(x, hist[-3:], s_s, a_t, s_t, h)[1]
    lam_s = hist[-1][0]
    r = [(lam - lam_s) / h for lam, _ in hist[-4:]]
    V = torch.tensor([[rj**k for k in range(4)] for rj in r], dtype=torch.float64)
    W = torch.linalg.inv(V).tolist()  # c = W m: the interpolant's coefficients
    phi1 = math.expm1(-h)
    phi2 = phi1 / h + 1.0
    phi3 = phi2 / h - 0.5
    coef = [-a_t * phi1, a_t * phi2, -2.0 * a_t * phi3, 6.0 * a_t * _phi4(h)]
    beta = [sum(coef[k] * W[k][j] for k in range(4)) for j in range(4)]
    high = (s_t / s_s) * x
    for b, (_, m) in zip(beta, hist[-4:], strict=True):
        high = high + b * m
    return low, high


def multistep_pair(x, hist, s_s: float, a_t: float, s_t: float, h: float):
    """``(x_low, x_high)`` one log-SNR step ``h`` on from ``x`` (noise std ``s_s``) to a
    time with kernel ``(a_t, s_t)``: DPM-Solver++ 2M / DDIM when ``hist`` holds the last
    two ``(lambda, data prediction)`` pairs, 3M / 2M when it holds three (Lu et al.
    2022b, variable-step multistep updates). Extrapolation only: no score evaluation.

    The 3M update is the exponential integrator with ``D`` expanded to second order in
    ``lambda``: ``x_t = (s_t/s_s) x - a_t phi_1 D + a_t h phi_2 D' - a_t h^2 phi_3 D''``
    (``phi_1 = expm1(-h)``, ``phi_2 = phi_1/h + 1``, ``phi_3 = phi_2/h - 1/2``), with
    ``h D' ~ d1`` and ``h^2 D'' ~ 2 d2`` from the backward differences (``d2 = (d1_0 -
    d1_1) / (r0 + r1) ~ h^2 D'' / 2``). The reference's ``third_update`` (and diffusers')
    weights ``d2`` by ``phi_3``, half the Taylor term, which leaves a local error of
    ``O(h^3)``, a second-order method; with ``2 phi_3`` it is ``O(h^4)``, tested by the
    ratio of local errors as ``h`` halves (16, where the reference's gives 8)."""
    phi1 = math.expm1(-h)
    (lam_s, m0), (lam_1, m1) = hist[-1], hist[-2]
    ddim = (s_t / s_s) * x - (a_t * phi1) * m0
    r0 = (lam_s - lam_1) / h
    d1_0 = (m0 - m1) / r0
    second = ddim - (0.5 * a_t * phi1) * d1_0
    if len(hist) < 3:
        return ddim, second
    lam_2, m2 = hist[-3]
    r1 = (lam_1 - lam_2) / h
    d1_1 = (m1 - m2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi2 = phi1 / h + 1.0
    phi3 = phi2 / h - 0.5
    third = (s_t / s_s) * x - (a_t * phi1) * m0 + (a_t * phi2) * d1 - (2.0 * a_t * phi3) * d2
    return second, third


class DPMAdaptive(KernelSolver):
    """Error-controlled DPM-Solver-12 / -23 in the log-SNR (Lu et al. 2022a, Alg. 4)."""

    name = "dpm_adaptive"
    supports_transform = True
    Config = DPMAdaptiveConfig

    def _points(self, sde, lam_s: float, lams: list[float], t_s: float, eps: float):
        """Times and kernel coefficients at the log-SNRs ``lams`` (bisection, float64)."""
        times = time_from_log_snr(sde, lams, eps, t_s)
        return KernelGrid.on(sde, times)

    def sample(self, score, sde, x, *, generator=None, callback=None, transform=None):
        c = self.config
        if c.method == "multistep":
            return self._sample_multistep(score, sde, x, callback, transform)
        eps, T = self.eps(sde), float(sde.T)
        lam_T, lam_eps = log_snr(sde, [T, eps])
        cap = c.nfe if c.nfe is not None else math.inf
        k = c.order - 1  # new evaluations per trial step
        left = cap - int(c.denoise)
        g0 = KernelGrid.on(sde, [T])
        t_s, a_s, s_s, lam_s = T, g0.a[0], g0.s[0], lam_T
        m_s = self.predict(score, x, t_s, a_s, s_s, "data")
        width = self._width(x, m_s, a_s, s_s)  # per state: rejected trials reuse it
        left -= 1
        scale = max(float(m_s.pow(2).mean().sqrt()), 1e-12)
        h = c.h_init
        r = (0.5,) if c.order == 2 else (1 / 3, 2 / 3)
        ticks, rejected, done = 0, False, 0  # progress ticks, last trial, accepted steps
        for _ in range(c.max_trials):
            if lam_s >= lam_eps - 1e-12:
                break
            final = left < 2 * k + 1  # no trial after this one could be paid for
            if final and h < lam_eps - lam_s:
                self._cap_bound(t_s, eps)
            last = final or h >= lam_eps - lam_s
            h = lam_eps - lam_s if last else h
            lam_t = lam_eps if last else lam_s + h  # land on eps exactly
            g = self._points(sde, lam_s, [lam_t, *(lam_s + ri * h for ri in r)], t_s, eps)
            if final and left < k:  # nothing left but DDIM from m_s
                x = (g.s[0] / s_s) * x - (g.a[0] * math.expm1(-h)) * m_s
                x_new, accept = x, True
            else:
                x_low, x_new = self._pair(score, x, m_s, s_s, g, h, r)
                left -= k
                if final:
                    accept = True
                else:
                    E = self._error(x_low, x_new, x, g.s[0], scale, width)
                    accept = E <= 1.0
                    fac = self._factor(E, c.order, rejected)
                    rejected = not accept
                    h = h * fac
            if not accept:
                continue
            x = x_new
            t_s, a_s, s_s, lam_s = g.t[0], g.a[0], g.s[0], lam_t
            done += 1
            if transform is not None:  # a guidance projection (guidance.py)
                x = transform(x, done, t_s)
            if lam_s < lam_eps - 1e-12:
                m_s = self.predict(score, x, t_s, a_s, s_s, "data")
                width = self._width(x, m_s, a_s, s_s)
                left -= 1
            ticks = self._progress(callback, ticks, (lam_s - lam_T) / (lam_eps - lam_T), t_s)
        else:
            raise self._no_end()
        return self.finish(score, sde, x, eps)

    def _sample_multistep(self, score, sde, x, callback, transform):
        """DPM-Solver++ 2M / 3M (Lu et al. 2022b, variable-step multistep updates) on
        error-controlled log-SNR steps. A trial's two solutions, orders ``order`` and
        ``order - 1``, extrapolate the data predictions already made, so a rejected
        trial costs no evaluation and an accepted step costs one, at its end: the
        embedded pair of Adams-type methods (Hairer, Norsett & Wanner, III.5). The first
        step, with nothing to extrapolate with, is controlled by the singlestep 2S / DDIM
        pair (one evaluation per trial; accepted without control, an error there stays:
        the flow of Gaussian data ended 3e-3 off at any tolerance); the second has a
        2M / DDIM pair, the later ones 3M / 2M. With a guidance projection
        (``transform``) every step is such a first step: the projection moves the state
        off the path the earlier predictions lie on."""
        c = self.config
        eps, T = self.eps(sde), float(sde.T)
        lam_T, lam_eps = log_snr(sde, [T, eps])
        cap = c.nfe if c.nfe is not None else math.inf
        left = cap - int(c.denoise)
        g0 = KernelGrid.on(sde, [T])
        t_s, a_s, s_s, lam_s = T, g0.a[0], g0.s[0], lam_T
        hist = [(lam_T, self.predict(score, x, t_s, a_s, s_s, "data"))]
        width = self._width(x, hist[0][1], a_s, s_s)  # per state: rejected trials reuse it
        left -= 1
        scale = max(float(hist[0][1].pow(2).mean().sqrt()), 1e-12)
        h, rejected, ticks, done, warned = c.h_init, False, 0, 0, False
        spread = False  # the cap binds: even steps from here
        reserve = max(4, math.ceil(cap / 2)) if math.isfinite(cap) else 0
        for _ in range(c.max_trials):
            if lam_s >= lam_eps - 1e-12:
                break
            # no evaluation left for the end of another step (the first step's trial
            # needs one more, at its midpoint); landing on eps needs none
            final = left < (2 if len(hist) == 1 else 1)
            # once steps cost one evaluation each, the cap pays for left + 1 more (the
            # last lands on eps with none). In the cap's second half, when steps of the
            # controller's size (or the run's mean step, if larger) would not reach eps
            # on those, the run would end in one
            # long uncontrolled leap; so from there on the steps are spread evenly in
            # log-SNR over what is left, accepted as they are. (Earlier, the controller's
            # steps say little about the rest: they shrink mid-run and grow again below
            # the modes' width, so a cap the run stays under never spreads.)
            spread = spread or (
                len(hist) > 1
                and not final
                and left + 1 <= reserve
                and max(h, (lam_s - lam_T) / done) * (left + 1) < lam_eps - lam_s
            )
            if spread:
                h = (lam_eps - lam_s) / (left + 1)
            if (spread or final and h < lam_eps - lam_s - 1e-12) and not warned:
                self._cap_bound(t_s, eps)
                warned = True
            last = final or h >= lam_eps - lam_s - 1e-12
            h = lam_eps - lam_s if last else h
            lam_t = lam_eps if last else lam_s + h
            g = self._points(sde, lam_s, [lam_t, lam_s + 0.5 * h], t_s, eps)
            a_t, s_t = g.a[0], g.s[0]
            m0 = hist[-1][1]
            low = (s_t / s_s) * x - (a_t * math.expm1(-h)) * m0  # DDIM
            order = 2 if len(hist) == 1 else min(c.order, len(hist))
            fac = c.facmax if c.facmax is not None else 10.0
            if final and len(hist) == 1 and left < 1:
                x_new = low  # nothing left to evaluate or extrapolate with
            else:
                if len(hist) == 1:
                    # the first step has nothing to extrapolate with: the singlestep
                    # DPM-Solver++(2S) / DDIM pair, one evaluation per trial
                    low, high = self._pair(score, x, m0, s_s, g, h, (0.5,))
                    left -= 1
                else:
                    pair = multistep_pair4 if order == 4 else multistep_pair
                    low, high = pair(x, hist[-order:], s_s, a_t, s_t, h)
                x_new = high
                if not (final or spread):
                    E = self._error(low, high, x, s_t, scale, width)
                    fac = self._factor(E, order, rejected)
                    rejected = E > 1.0
                    if rejected:  # retry from the same state: no evaluation spent
                        h *= fac
                        continue
            x = x_new
            t_s, a_s, s_s, lam_s = g.t[0], a_t, s_t, lam_t
            done += 1
            if transform is not None:  # a guidance projection (guidance.py)
                x = transform(x, done, t_s)
            if lam_s < lam_eps - 1e-12:
                # a projection moved x off the path the earlier predictions were made
                # on: extrapolating them would measure its jump (a replacement's fresh
                # noise every step: 815 evaluations where 39 do without), so the next
                # step starts afresh with the singlestep pair
                keep = 0 if transform is not None else max(c.order, 3) - 1
                m_t = self.predict(score, x, t_s, a_t, s_t, "data")
                hist = [*hist[len(hist) - keep :], (lam_s, m_t)]
                width = self._width(x, hist[-1][1], a_t, s_t)
                left -= 1
                h *= fac
            ticks = self._progress(callback, ticks, (lam_s - lam_T) / (lam_eps - lam_T), t_s)
        else:
            raise self._no_end()
        return self.finish(score, sde, x, eps)

    def _cap_bound(self, t: float, eps: float) -> None:
        """Warn that the ``nfe`` cap, not the error control, ends the run: the steps
        from ``t`` to ``eps`` are not held to the tolerance."""
        warnings.warn(
            f"solver {self.name!r}: the nfe = {self.config.nfe} cap ended the error "
            f"control at t = {t:.3g}; the steps from there to eps = {eps:.3g} are not "
            f"held to ntol = {self.config.ntol:g}: raise nfe or ntol",
            UserWarning,
            stacklevel=2,
        )

    def _no_end(self) -> DiffuseError:
        """The error for a run that used ``max_trials`` trial steps without reaching eps."""
        return DiffuseError(
            f"solver {self.name!r}: no end after max_trials = {self.config.max_trials} "
            "trial steps; raise max_trials or ntol"
        )

    def _width(self, x, m, a: float, s: float) -> float:
        """``tolerance = "width"``: the width of ``p_t``'s modes over the noise std, from
        the state ``x`` and its data prediction ``m`` at kernel ``(a, s)``. Within a
        Gaussian mode of std ``w``, ``x / a`` has std ``sqrt(w^2 + sigma^2)`` and the
        predicted noise ``(x - a m) / s`` has RMS ``sigma / sqrt(w^2 + sigma^2)``, so
        the width is ``s`` over that RMS (over the batch; never below ``s``). The flow
        maps an error ``d`` made there to ``d w / sqrt(w^2 + sigma^2)`` in the sample,
        so ``ntol`` times the width keeps each step's share of the end error near
        ``ntol * w`` at every noise level, where ``ntol * s`` demands ever smaller
        errors once the noise is below the modes' width. The factor is taken at the
        step's start and applied to the end's noise std: below the modes' width that is
        ``ntol * a * w * e^-h``, a little tighter than ``ntol * a * w``. Batches of fewer
        than :data:`WIDTH_MIN_NUMBERS` numbers get 1.

        ``tolerance = "data_width"`` returns ``max(sqrt(W^2 - 1), noise_share)``: in a
        Gaussian mode ``sqrt(W^2 - 1) = w / sigma``, the data's own width rather than
        ``p_t``'s, so ``delta = ntol * a * max(w_t, noise_share * sigma)`` with ``w_t``
        the width the predictions read. While the modes are not yet apart ``w_t`` is
        about the spread a sample may still end up anywhere in (the data's scale, then
        the between-mode distance), and an error there reaches the sample as that
        spread's share of the noise, not as a mode's: the noise alone, ``ntol *
        sigma``, let ``ring-narrow``'s centres err by 1.5 % of a mode's width, made where
        ``sigma`` is above the ring's radius. Weighing the noise by ``noise_share``
        tightens those steps and loosens the ones below the modes' width."""
        c = self.config
        if c.tolerance not in ("width", "data_width") or x.numel() < WIDTH_MIN_NUMBERS:
            return 1.0
        rms = float(((x - a * m) / s).pow(2).mean().sqrt())
        W = 1.0 / rms if 0.0 < rms < 1.0 else 1.0
        if c.tolerance == "width":
            return W
        # the data's own mode width over the noise std: W^2 = (w^2 + sigma^2) / sigma^2
        return max(math.sqrt(W * W - 1.0), c.noise_share)

    def _error(self, low, high, x, s_t: float, scale: float, width: float = 1.0) -> float:
        """The step's error estimate ``E``: the RMS of ``(high - low) / delta`` per sample,
        combined over the batch by ``norm``; ``delta`` the configured tolerance
        (``width``: :meth:`_width`'s factor over the noise std)."""
        c = self.config
        if c.tolerance in ("noise", "width", "data_width"):
            delta = torch.full_like(low, c.ntol * s_t * width)
        else:
            delta = torch.maximum(
                torch.full_like(low, c.atol * scale),
                c.rtol * torch.maximum(low.abs(), x.abs()),
            )
        per = ((high - low) / delta).flatten(1).pow(2).mean(1).sqrt()
        E = float(per.max() if c.norm == "max" else per.pow(2).mean().sqrt())
        if not math.isfinite(E):
            raise DiffuseError(
                f"solver {self.name!r}: the step's error estimate is {E} at noise std {s_t:.3g}:"
                " the score model returned NaN/Inf"
            )
        return E

    def _factor(self, E: float, order: int, rejected: bool) -> float:
        """The next step's ``h`` over this one's: ``theta E^(-1/order)``, at most
        ``facmax``, and at most 1 right after a rejected trial (Hairer et al., II.4)."""
        c = self.config
        fac = c.theta * max(E, 1e-10) ** (-1.0 / order)
        if c.facmax is not None:
            fac = min(fac, 1.0 if rejected else c.facmax)
        return fac

    def _progress(self, callback, ticks: int, done: float, t: float) -> int:
        """Report progress in log-SNR up to the fraction ``done``, in ``steps`` ticks (the
        total the engine's progress bar counts per shard)."""
        if callback is None:
            return ticks
        total = self.config.steps
        now = min(total, int(total * done + 1e-9))
        for tick in range(ticks + 1, now + 1):
            callback(tick, total, t)
        return max(ticks, now)

    def _pair(self, score, x, m_s, s_s, g, h, r):
        """``(x_low, x_high)`` at ``g.t[0]`` from ``x`` at ``s`` (DPM-Solver++ singlestep
        updates, Lu et al. 2022b, App. A): orders 1/2 or 2/3 sharing evaluations."""
        a_t, s_t = g.a[0], g.s[0]
        p1 = math.expm1(-h)  # e^{-h} - 1: x_t = (s_t/s_s) x - a_t p1 m + ...
        if len(r) == 1:
            u = (g.s[1] / s_s) * x - (g.a[1] * math.expm1(-r[0] * h)) * m_s
            m1 = self.predict(score, u, g.t[1], g.a[1], g.s[1], "data")
            low = (s_t / s_s) * x - (a_t * p1) * m_s
            high = low - (0.5 / r[0] * a_t * p1) * (m1 - m_s)
            return low, high
        r1, r2 = r
        q1, q2 = math.expm1(-r1 * h), math.expm1(-r2 * h)
        u1 = (g.s[1] / s_s) * x - (g.a[1] * q1) * m_s
        m1 = self.predict(score, u1, g.t[1], g.a[1], g.s[1], "data")
        # second order from (s, u1): the lower solution
        low = (s_t / s_s) * x - (a_t * p1) * m_s - (0.5 / r1 * a_t * p1) * (m1 - m_s)
        # third order (Lu et al. 2022b singlestep 3S): u2 from (s, u1), then (s, u2)
        psi22 = q2 / (-r2 * h) - 1.0
        u2 = (g.s[2] / s_s) * x - (g.a[2] * q2) * m_s - (r2 / r1 * g.a[2] * psi22) * (m1 - m_s)
        m2 = self.predict(score, u2, g.t[2], g.a[2], g.s[2], "data")
        p2 = p1 / (-h) - 1.0
        high = (s_t / s_s) * x - (a_t * p1) * m_s - (a_t * p2 / r2) * (m2 - m_s)
        return low, high


@hookimpl
def diffuse_register_solvers():
    return [DPMAdaptive]
