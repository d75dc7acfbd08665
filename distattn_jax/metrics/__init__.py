"""Pairwise distances: one :class:`Metric` record per distance, and one registry every kernel reads.

Every metric maps ``x [..., N, D]`` and ``y [..., M, D]`` to ``[..., N, M]``; the leading (batch) dimensions
broadcast against each other. Distances are ``>= 0``; ``dot`` is the similarity ``x . y`` that standard
attention uses and rides in the same registry as the baseline (its record says ``similarity=True``).

    da.metrics.l1(x, y); da.metrics.lp(x, y, p=3.0); da.metrics.get("cosine")(x, y)
    da.metrics.register(da.metrics.Metric("huber", da.metrics.Elementwise(phi=huber)))  # then metric="huber"
    da.metrics.register(..., overwrite=True)  # replace it (a notebook cell run again); da.metrics.unregister("huber")

Weighted metrics: ``weighted_l1`` (``sum_d w_d |x_d - y_d|``) and ``weighted_l2`` (``sqrt(sum_d w_d (x_d -
y_d)^2)``, a diagonal Mahalanobis distance) take non-negative per-feature weights, ``metric_weights=w``
(``da.metrics.weighted_l1(x, y, metric_weights=w)``; in attention one vector per head, learned by the modules).
Each is its base metric on rescaled features (the record's ``feature_scale``: ``w`` and ``sqrt(w)``), so every
kernel runs it unchanged; ``w = 1`` (the default) is l1 or l2. A registered record with a ``feature_scale`` is a
weighted metric too.

Names users know: ``l1`` is scipy's ``cityblock`` and ``torch.cdist(p=1)``, ``l2`` is ``euclidean`` and
``torch.cdist(p=2)``, ``lp`` is ``minkowski``, ``chebyshev`` is scipy's ``chebyshev`` (``torch.cdist(p=inf)``),
``cosine`` is scipy's ``cosine`` (``1 - torch.nn.functional.cosine_similarity``).

Forms (:mod:`.record`): ``l1``, ``l2``, ``chebyshev`` and ``lp`` are elementwise (:mod:`.elementwise`: a loop over
features forward, key and query loops backward, never a ``[..., N, M, D]`` tensor); ``sqeuclidean``, ``cosine``
and ``dot`` are gram forms (:mod:`.gram`: matmuls at ``Precision.HIGHEST``, whatever precision the caller
passes).

Precision (:mod:`.numerics`): inputs stay in their dtype, every reduction accumulates in at least float32
(float64 inputs stay float64), and the metric functions return the inputs' dtype. :func:`score` returns the signed attention score
(``-distance`` or ``+similarity``) in the accumulation dtype, for the kernels. Elementwise forms see the
differences ``x_d - y_d`` themselves, so ``l2`` and ``lp`` (and their gradients) stay accurate to a few float32
ulps even for nearly equal vectors. The gram form of ``sqeuclidean`` carries an absolute error of about
``eps |x - c|^2`` (``c`` the mean key), and its gradient ``2 (x - y)`` an absolute error of about
``eps |x - c|``: both small beside the values the softmax sees.

Gradient conventions (finite everywhere; each record's ``gradient`` field states its own):

* ``l1``: ``d|t|/dt = sign(t)`` with ``sign(0) = 0``, the minimum-norm subgradient.
* ``l2`` and ``lp``: the gradient with respect to either argument is 0 at zero distance. For ``lp`` with
  ``p < 1`` a coordinate whose difference is exactly 0 contributes 0 (its true partial derivative is infinite).
* ``chebyshev``: the coordinates that tie for the maximum share the gradient equally; ``sign(0) = 0`` as for
  ``l1``, so equal vectors get gradient 0.
* ``cosine``: ``cosine(x, y) = 1 - x.y / (|x| |y|)``; a zero vector has similarity 0 with everything (distance 1)
  and receives gradient 0.
* ``lp`` with a traced (learnable) ``p``: ``d lp / dp`` is exact, ``lp/p * sum_k u_k^p log u_k`` with
  ``u = |x - y| / lp``, and 0 at zero distance.
"""

from distattn_jax.metrics import elementwise, evaluate, gram, numerics, record, shipped
from distattn_jax.metrics.evaluate import scale_features, score
from distattn_jax.metrics.numerics import (accumulation_dtype, check_metric_weights, check_p, concrete_value,
                                          sum_to_shape)
from distattn_jax.metrics.record import (ELEMENTWISE_BLOCKS, GRAM_BLOCKS, DistanceType, Elementwise, Gram, Metric,
                                         available, canonical_name, get, register, unregister)
from distattn_jax.metrics.shipped import chebyshev, cosine, dot, l1, l2, lp, sqeuclidean, weighted_l1, weighted_l2

__all__ = ["DistanceType", "ELEMENTWISE_BLOCKS", "Elementwise", "GRAM_BLOCKS", "Gram", "Metric",
           "accumulation_dtype", "available", "canonical_name", "chebyshev", "check_metric_weights", "check_p",
           "concrete_value", "cosine", "dot", "get", "l1", "l2", "lp", "register", "scale_features", "score",
           "sqeuclidean", "sum_to_shape", "unregister", "weighted_l1", "weighted_l2"]
