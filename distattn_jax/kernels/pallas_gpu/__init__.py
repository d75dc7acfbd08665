"""A fused GPU kernel for every metric in ``jax.experimental.pallas`` (the Triton lowering).

Forward: one program per (batch, query head, query tile). The query tile stays on chip while the program
streams the key/value tiles of its key/value head (grouped-query heads map through the BlockSpec index maps),
computes the score tile, keeps the online-softmax statistics in float32 and writes the output and ``lse``.
Backward (the transpose of the tangent map): a dq kernel (one program per query tile, streaming key tiles; it
also writes the per-row partial sums of the ``lam`` and ``p`` gradients and the bias gradient) and a dk/dv kernel
(one program per key tile, streaming query tiles). Neither holds anything of size ``T x S`` except the bias
gradient, which is produced only when the bias gets a gradient and then in the bias's own shape: the dq program
sums it over the key tiles of a ``[.., T, 1]`` bias, writes one row per query tile for a ``[.., 1, S]`` bias
(summed outside) and, for a bias shared by the batch or the heads, loops over them itself, so that a
``[1, 1, T, S]`` bias gets one ``T x S`` float32 gradient, not ``B * H`` of them. The transpose is told which
cotangents are needed (:func:`distattn_jax.autodiff.linear_call`'s ``transpose_needs``) and launches only the
programs they come from. Forward mode (``jax.jvp``, ``jacfwd``,
``linearize``, ``hessian``): no Triton program; the tangent is the tile core's XLA loop (linear memory, XLA's
speed) inside a ``jax.custom_jvp`` whose tangent map transposes to the two backward programs (:mod:`.calls`).
Forward over reverse (Hessian-vector products) differentiates the tile core's XLA backward in the backward
programs' place, since a ``pallas_call`` has no forward-mode rule: same values, the memory of autodiff of a loop.

The kernel is generated from the metric record (:mod:`distattn_jax.metrics.record`), so a user-registered
metric gets a fused kernel too:

* :class:`~distattn_jax.metrics.Gram` forms: each term ``sum_d x^a y^b`` is a matmul on the tensor cores
  (``jax.experimental.pallas.triton.dot``), or a row sum where an exponent is 0; the record's ``fn`` is applied to
  the tiles, and its derivative comes from ``jax.vjp`` of ``fn`` on the tile. Centring (translation-invariant
  records) and row normalisation (``normalize=True``) are applied to ``q`` and ``k`` before the kernel, in
  float32, so autodiff carries their gradient. Every matmul takes 16-bit operands with float32 accumulation, never
  Triton's IEEE float32 path (scalar FMA loops): 16-bit inputs as they are, a float32 operand split into
  bfloat16 pieces (:mod:`.gram`): three pieces (six matmuls) for float32 inputs, as accurate as IEEE float32
  (8.5e-8 of ``|q||k|`` per score); two (three matmuls, 1.1e-5) for 16-bit inputs that centring or normalisation
  made float32. Against the float64 oracle (``experiments/selfcheck.py --implementations=pallas``, interpreted on
  CPU; docs/kernels.md has the table and the command) float32 outputs and gradients of sqeuclidean, cosine and
  dot are within 2.5e-6 of the largest entry, as with IEEE float32 matmuls, but for sqeuclidean's lam gradient
  under packed segments (3.1e-5 against IEEE's 1.1e-5: a sum of ``dS * score`` that cancels to a small result);
  16-bit outputs are those of IEEE float32 matmuls to two digits, their gradients within 10%.
* :class:`~distattn_jax.metrics.Elementwise` forms: the difference tile is feature-major, ``[bd, bq, bk]``, and
  reduced over its leading axis on the CUDA cores in float32, ``bd`` features at a time, so that the sum stays in
  each thread's registers under Triton's layout (:mod:`.elementwise`); the program's own tile is loaded once,
  chunk by chunk, and stays on chip. ``phi``'s and ``root``'s derivatives come from ``jax.jvp`` of the record's
  own functions, with the same conventions as :mod:`.metrics.elementwise` (ties of ``reduce="max"`` share the
  gradient, a non-finite root derivative gives 0, ``rescale``).

Each program has its own tiles and launch parameters (``config.DEFAULT_TILES``, per form, width, dtype and
program); every grid is (tile, head, batch), tiles fastest, so that the programs running at one time share one
head's key/value tiles in L2 (:mod:`.calls`).

The programs' logits are in log2 units (log2(e) folded into the per-head scale) so that the softmax runs on
``exp2``, one GPU instruction; ``lse`` is in natural units at the interface. With ``is_causal`` key tiles
entirely above the diagonal are skipped. Segment ids and sequence lengths are
evaluated per tile from ``[B, T]``/``[B, S]`` arrays; lengths that are not multiples of the tile are padded
inside and the padding masked. ``interpret=True`` runs the same kernel through Pallas' interpreter on any
backend (CPU in the tests).

The package's files mirror that structure: :mod:`.config` (tiles, the static call description), :mod:`.gram`
and :mod:`.elementwise` (the two metric forms' tiles and their VJPs), :mod:`.tile` (one tile pair: form, mask
rule, logits), :mod:`.programs` (the forward, dq and dk/dv programs), :mod:`.calls` (``pallas_call`` and the
custom_jvp) and :mod:`.kernel` (the :class:`Pallas` object). The online-softmax step, its finalisation, the
backward row terms and the tile ranges a causal mask or window skips are the shared tile core's
(:mod:`distattn_jax.kernels.tiles`).
"""

from distattn_jax.kernels import registry
from distattn_jax.kernels.pallas_gpu.config import Tiles, default_tiles
from distattn_jax.kernels.pallas_gpu.kernel import Pallas

__all__ = ["Pallas", "Tiles", "default_tiles"]

registry.register("pallas", Pallas())
