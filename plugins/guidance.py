"""Built-in guidance for class conditions: ``conditional``, ``cfg`` and ``classifier``.

* ``conditional``: sample with the conditional score ``s(x, t, cond)`` as it is (what
  ``cond=`` alone does).
* ``cfg``, classifier-free guidance (Ho & Salimans 2022): with the conditional score
  ``s_c = s(x, t, cond)`` and the unconditional ``s_u = s(x, t, None)`` of one model
  (trained with label dropout), the guided score is ``s_c + w (s_c - s_u)``, ``w =
  scale``. ``w = 0`` is conditional sampling; diffusers' ``guidance_scale`` is ``1 + w``.
  It samples ``p_t(x) p_t(c | x)^(1 + w)`` up to the approximation that a tilted
  marginal is the marginal of a tilted law (exact at ``w = 0``).
* ``classifier``, classifier guidance (Dhariwal & Nichol 2021; Song et al. 2021,
  App. I): ``s_u + w grad_x log p_t(y | x)`` from a noise-conditional classifier's
  logits, by autograd. At ``w = 1`` with the exact score and the exact classifier this
  is Bayes' rule: the score of ``p_t(x | y)``.

Each evaluation of the guided score costs one model call (``conditional``,
``classifier``) or two (``cfg``: the conditional and the unconditional score), and the
engine counts them that way. All three work with every solver.
"""

from __future__ import annotations

import torch

from diffuse_engine import DiffuseError, Guidance, Guided, hookimpl
from diffuse_engine.components.guidance import check_labels


class LabelGuidance(Guidance):
    """Shared by the class-label methods: ``cond={"label": (n,) integer tensor}``."""

    requires = ("label",)

    def validate(self, cond, shape):
        cond = super().validate(cond, shape)
        check_labels(cond["label"], shape[0], None)
        return cond


class Conditional(LabelGuidance):
    """The conditional score as it is: ``s(x, t, cond)``."""

    name = "conditional"
    needs_conditional_score = True

    def bind(self, score, sde, cond, *, classifier=None, generator=None):
        return Guided(score=lambda x, t: score(x, t, cond))


class ClassifierFree(LabelGuidance):
    """``s_c + scale (s_c - s_u)`` (Ho & Salimans 2022)."""

    name = "cfg"
    needs_conditional_score = True
    needs_unconditional_score = True

    def calls_per_evaluation(self) -> int:
        """Two model calls (conditional and unconditional), one at ``scale = 0``."""
        return 1 if self.config.scale == 0 else 2

    def bind(self, score, sde, cond, *, classifier=None, generator=None):
        w = self.config.scale

        def guided(x, t):
            s_c = score(x, t, cond)
            if w == 0:
                return s_c
            s_u = score(x, t, None)
            return torch.add(s_c, s_c - s_u, alpha=w)

        return Guided(score=guided)


class ClassifierGuidance(LabelGuidance):
    """``s_u + scale grad_x log p_t(y | x)`` from ``classifier(x, t) -> logits``."""

    name = "classifier"
    needs_classifier = True
    needs_unconditional_score = True

    def check(self, solver, sde, score, classifier):
        super().check(solver, sde, score, classifier)
        check_with = getattr(classifier, "check_with", None)  # a trained classifier's
        if check_with is not None:  # SDE and data coordinates must be the score's
            check_with(score, sde)

    def bind(self, score, sde, cond, *, classifier=None, generator=None):
        w, y = self.config.scale, cond["label"]

        def guided(x, t):
            s_u = score(x, t, None)
            if w == 0:
                return s_u
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                logits = classifier(xg, t)
                if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                    raise DiffuseError(
                        f"classifier returned shape {tuple(logits.shape)}; expected logits "
                        f"(B, K) for a batch of {x.shape[0]}"
                    )
                if int(y.max()) >= logits.shape[1]:
                    raise DiffuseError(
                        f"label {int(y.max())} is out of range for a classifier of "
                        f"{logits.shape[1]} classes"
                    )
                log_p = torch.log_softmax(logits, dim=1).gather(1, y[:, None]).sum()
                (grad,) = torch.autograd.grad(log_p, xg)
            return torch.add(s_u, grad.to(s_u.dtype), alpha=w)

        return Guided(score=guided)


@hookimpl
def diffuse_register_guidance():
    return [Conditional, ClassifierFree, ClassifierGuidance]
