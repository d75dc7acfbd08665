"""A linear map with a hand-written transpose: how the memory-lean kernels get forward mode and keep their VJPs.

The elementwise metric forms and the tiled kernels have hand-written backward passes that never hold a
``T x S`` (or ``N x M x D``) array. Forward mode (``jax.jvp``, ``jacfwd``, ``linearize``, ``hessian``) needs a
``jax.custom_jvp``, and JAX derives reverse mode from a ``custom_jvp`` by transposing its tangent map. So the
tangent map is computed by :func:`linear_call`: evaluated, it runs the kernel's own lean tangent loops;
transposed, it runs the kernel's backward loops. Reverse mode therefore costs what a ``custom_vjp`` with that
backward costs (the same compiled operations and temporaries), and forward mode gets a tangent of the same
memory class.

Why not the two tools JAX offers: a ``jax.custom_vjp`` called inside a ``custom_jvp`` rule cannot be
transposed (``custom_vjp_call`` has no transpose rule, so ``jax.grad`` fails), and
``jax.custom_derivatives.linear_call`` transposes as wanted but has no derivative in its residuals (its JVP
rule asserts their tangents are zero, so ``jax.hessian`` and ``jvp`` of ``grad`` fail) and no batching rule
(``jacfwd`` vmaps). The primitive here adds both:

* differentiating it in the residuals runs plain JAX autodiff through the map (or, once transposed, through the
  backward loops) -- second-order derivatives are rarer and may hold what autodiff of a loop holds. A transpose
  JAX cannot differentiate (a ``pallas_call`` has no forward-mode rule) names an equal one it can
  (``linear_call(..., derivable_transpose=...)``), used for those derivatives only;
* ``vmap`` maps both functions.

Transposed where only some linear arguments need a cotangent (``jax.grad`` in q alone), the backward is cut to
those by JAX's dead code elimination, as a ``custom_vjp``'s would be. Dead code elimination cannot split one
primitive with several outputs (a ``pallas_call`` keeps every output whichever are used), so a transpose built
of such calls may ask to be told which cotangents are needed (``linear_call(..., transpose_needs=True)``) and
not launch, or not write, the rest. A printed jaxpr shows the call as one
``distattn_linear_call`` equation; its ``maps`` parameter's ``jaxpr`` is the map's own, for tools that walk a
program (``maps.jaxpr``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir
from jax.interpreters import partial_eval as pe

Array = jax.Array


class _Maps:
  """The two flat functions of one :func:`linear_call` and the types of their operands (a primitive parameter,
  hashed by identity: each call site binds its own)."""

  __slots__ = ("fun", "transpose", "res_avals", "lin_avals", "out_avals", "fun_keep", "transpose_keep",
               "fun_derivable", "transpose_derivable")

  def __init__(self, fun: Callable, transpose: Callable, res_avals: tuple, lin_avals: tuple, out_avals: tuple,
               fun_keep: Callable | None = None, transpose_keep: Callable | None = None,
               fun_derivable: Callable | None = None, transpose_derivable: Callable | None = None):
    self.fun = fun
    self.transpose = transpose
    self.res_avals = res_avals
    self.lin_avals = lin_avals
    self.out_avals = out_avals
    # ``fun_keep(keep, *args)``: ``fun``'s outputs, told which (``keep``, a tuple of bools) its caller uses, so
    # that it can leave out work dead code elimination cannot (the others may be any value of their type).
    self.fun_keep = fun_keep
    self.transpose_keep = transpose_keep
    # Functions equal to ``fun`` and ``transpose`` that JAX can differentiate, where those cannot be (None: they
    # can); only derivatives in the residuals call them.
    self.fun_derivable = fun_derivable
    self.transpose_derivable = transpose_derivable

  @property
  def derivable(self) -> Callable:
    """``fun``, or the equal function JAX can differentiate where ``fun`` cannot be."""
    return self.fun if self.fun_derivable is None else self.fun_derivable

  @property
  def num_res(self) -> int:
    return len(self.res_avals)

  @property
  def jaxpr(self) -> jex_core.ClosedJaxpr:
    """``fun`` as a closed jaxpr (traced on demand), for tools that walk a program's jaxprs."""
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in self.res_avals + self.lin_avals]
    return jax.make_jaxpr(self.fun)(*structs)

  def __repr__(self) -> str:
    # What a printed jaxpr shows for the parameter.
    return f"{getattr(self.fun, '__name__', 'fun')}/{getattr(self.transpose, '__name__', 'transpose')}"

  def transposed(self) -> "_Maps":
    return _Maps(self.transpose, self.fun, self.res_avals, self.out_avals, self.lin_avals, self.transpose_keep,
                 self.fun_keep, self.transpose_derivable, self.fun_derivable)

  def pruned(self, keep: list[bool]) -> "_Maps":
    """The map restricted to the outputs ``keep`` marks, with the computation of the others removed (JAX's dead
    code elimination of ``fun``'s jaxpr, into shard_maps and loops): a transpose whose caller needs the
    cotangents of some linear arguments only (reverse mode in q alone) does not compute, or reduce over a mesh,
    the others'."""
    out_avals, num_res = self.out_avals, self.num_res

    def kept_outputs(fun):
      return lambda *args: [o for o, k in zip(fun(*args), keep) if k]

    def with_zero_cotangents(transpose):  # the dropped outputs' cotangents are zeros
      def kept_transpose(*args):
        cts = iter(args[num_res:])
        full = [next(cts) if k else jnp.zeros(a.shape, a.dtype) for k, a in zip(keep, out_avals)]
        return transpose(*args[:num_res], *full)
      kept_transpose.__name__ = getattr(transpose, "__name__", "transpose")
      return kept_transpose

    fun = self.fun if self.fun_keep is None else functools.partial(self.fun_keep, tuple(keep))
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in self.res_avals + self.lin_avals]
    closed = jax.make_jaxpr(kept_outputs(fun))(*structs)
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * sum(keep), instantiate=True)
    kept_fun = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(jaxpr, closed.consts))
    kept_fun.__name__ = getattr(self.fun, "__name__", "fun")
    kept_avals = tuple(a for a, k in zip(out_avals, keep) if k)
    return _Maps(kept_fun, with_zero_cotangents(self.transpose), self.res_avals, self.lin_avals, kept_avals,
                 fun_derivable=None if self.fun_derivable is None else kept_outputs(self.fun_derivable),
                 transpose_derivable=None if self.transpose_derivable is None else with_zero_cotangents(
                     self.transpose_derivable))


_linear_call_p = jex_core.Primitive("distattn_linear_call")
_linear_call_p.multiple_results = True


def _impl(*args, maps: _Maps):
  return list(maps.fun(*args))


_linear_call_p.def_impl(_impl)
_linear_call_p.def_abstract_eval(lambda *_, maps: list(maps.out_avals))
mlir.register_lowering(_linear_call_p, mlir.lower_fun(_impl, multiple_results=True))


def _is_zero(t) -> bool:
  return type(t) is ad.Zero


def _jvp(primals, tangents, *, maps: _Maps):
  res, lin = primals[:maps.num_res], primals[maps.num_res:]
  res_dot, lin_dot = tangents[:maps.num_res], tangents[maps.num_res:]
  out = _linear_call_p.bind(*primals, maps=maps)
  out_dot = None
  if not all(_is_zero(t) for t in lin_dot):
    # Linear in the linear arguments: the same map applied to their tangents (it transposes as this one does).
    out_dot = _linear_call_p.bind(*res, *(ad.instantiate_zeros(t) for t in lin_dot), maps=maps)
  moving = [i for i, t in enumerate(res_dot) if not _is_zero(t)]
  if moving:
    # Through the residuals the map is an ordinary function: plain autodiff of the loops that compute it.
    def of_residuals(*moved):
      full = list(res)
      for i, value in zip(moving, moved):
        full[i] = value
      return list(maps.derivable(*full, *lin))

    _, extra = jax.jvp(of_residuals, [res[i] for i in moving], [res_dot[i] for i in moving])
    out_dot = extra if out_dot is None else [a + b for a, b in zip(out_dot, extra)]
  if out_dot is None:
    out_dot = [ad.Zero(a.to_tangent_aval()) for a in maps.out_avals]
  return out, out_dot


def _transpose(cts, *args, maps: _Maps):
  res, lin = args[:maps.num_res], args[maps.num_res:]
  if any(ad.is_undefined_primal(r) for r in res):
    raise ValueError("linear_call: the map is linear in its linear arguments only; it cannot be transposed with "
                     "respect to a residual")
  cts = [jnp.zeros(a.shape, a.dtype) if _is_zero(ct) else ct for ct, a in zip(cts, maps.out_avals)]
  wanted = [ad.is_undefined_primal(x) for x in lin]  # the others are constants (instantiated zero tangents)
  if not any(wanted):
    return [None] * len(args)
  transposed = maps.transposed()
  if not all(wanted):
    transposed = transposed.pruned(wanted)
  lin_cts = iter(_linear_call_p.bind(*res, *cts, maps=transposed))
  return [None] * maps.num_res + [next(lin_cts) if w else None for w in wanted]


def _batch(args, dims, *, maps: _Maps):
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  args = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
  axes = [None if d is None else 0 for d in dims]
  lin_axes = axes[maps.num_res:]
  num_out = len(maps.out_avals)

  def fun_of(inner):
    def fun(*a):
      return jax.vmap(lambda *b: list(inner(*b)), in_axes=axes, out_axes=0)(*a)
    return fun

  def transpose_of(inner):
    def transpose(*a):
      outs = jax.vmap(lambda *b: list(inner(*b)), in_axes=axes[:maps.num_res] + [0] * num_out, out_axes=0)(*a)
      # A linear argument shared by the whole batch receives the sum of the batch's cotangents.
      return [o if ax == 0 else jnp.sum(o, axis=0) for o, ax in zip(outs, lin_axes)]
    return transpose

  transpose = transpose_of(maps.transpose)
  def transpose_keep(keep, *a):
    return transpose_of(functools.partial(maps.transpose_keep, keep))(*a)

  def batched(avals, in_axes):
    return tuple(a if ax is None else jax.core.ShapedArray((size,) + a.shape, a.dtype)
                 for a, ax in zip(avals, in_axes))

  new = _Maps(fun_of(maps.fun), transpose, batched(maps.res_avals, axes[:maps.num_res]), batched(maps.lin_avals, lin_axes),
              batched(maps.out_avals, [0] * num_out),
              transpose_keep=None if maps.transpose_keep is None else transpose_keep,
              fun_derivable=None if maps.fun_derivable is None else fun_of(maps.fun_derivable),
              transpose_derivable=None if maps.transpose_derivable is None else transpose_of(
                  maps.transpose_derivable))
  return _linear_call_p.bind(*args, maps=new), [0] * num_out


ad.primitive_jvps[_linear_call_p] = _jvp
ad.primitive_transposes[_linear_call_p] = _transpose
batching.primitive_batchers[_linear_call_p] = _batch


def _name(fn: Callable) -> str:
  return getattr(getattr(fn, "func", fn), "__name__", type(fn).__name__)


def linear_call(fun: Callable, fun_transpose: Callable, residual_args: Any, linear_args: Any, *,
                transpose_needs: bool = False, derivable_transpose: Callable | None = None) -> Any:
  """``fun(residual_args, linear_args)``, a map linear in ``linear_args``, whose transpose is
  ``fun_transpose(residual_args, cotangent)`` (returning the structure of ``linear_args``).

  With ``transpose_needs=True`` the transpose is called ``fun_transpose(residual_args, cotangent, needed)``,
  ``needed`` a pytree of bools of ``linear_args``' structure marking the cotangents the caller uses; those not
  needed may be returned as zeros of their type (they are dropped). For transposes whose unneeded outputs dead
  code elimination cannot remove (several outputs of one ``pallas_call``).

  Evaluated, jitted or differentiated in forward mode it runs ``fun``; transposed (reverse mode) it runs
  ``fun_transpose``. Its derivative in ``residual_args`` is JAX's autodiff of ``fun`` (or of ``fun_transpose`` in
  a transposed map: the Hessian-vector product, forward over reverse). Where JAX cannot differentiate
  ``fun_transpose`` (it launches a ``pallas_call``), ``derivable_transpose``, called as ``fun_transpose`` is and
  returning the same values, is differentiated in its place; it never runs otherwise. Both functions must be written with JAX operations and must not close over traced values
  (pass them as residuals). ``residual_args`` is a pytree of arrays of any dtype (integer masks, random keys)
  and None; ``linear_args`` one of floating-point arrays and None.
  """
  res_flat, res_tree = jax.tree.flatten(residual_args)
  lin_flat, lin_tree = jax.tree.flatten(linear_args)
  num_res = len(res_flat)
  out_trees = []

  def flat_fun(*args):
    res, lin = jax.tree.unflatten(res_tree, args[:num_res]), jax.tree.unflatten(lin_tree, args[num_res:])
    leaves, tree = jax.tree.flatten(fun(res, lin))
    if not out_trees:
      out_trees.append(tree)
    return leaves

  def flat_transpose_keep(keep, *args):
    res, cts = jax.tree.unflatten(res_tree, args[:num_res]), jax.tree.unflatten(out_tree, args[num_res:])
    if transpose_needs:
      out = fun_transpose(res, cts, jax.tree.unflatten(lin_tree, list(keep)))
    else:
      out = fun_transpose(res, cts)
    if jax.tree.structure(out) != lin_tree:
      raise TypeError(f"linear_call: fun_transpose must return the structure of linear_args, {lin_tree}; got "
                      f"{jax.tree.structure(out)}")
    return jax.tree.leaves(out)

  def flat_transpose(*args):
    return flat_transpose_keep((True,) * len(lin_flat), *args)

  flat_transpose_derivable = None
  if derivable_transpose is not None:
    def flat_transpose_derivable(*args):
      res, cts = jax.tree.unflatten(res_tree, args[:num_res]), jax.tree.unflatten(out_tree, args[num_res:])
      if transpose_needs:
        return jax.tree.leaves(derivable_transpose(res, cts, jax.tree.unflatten(lin_tree, [True] * len(lin_flat))))
      return jax.tree.leaves(derivable_transpose(res, cts))

  flat_fun.__name__, flat_transpose.__name__ = _name(fun), _name(fun_transpose)
  # The output types (shapes, dtypes and, under Explicit mesh axes, shardings) from one abstract trace.
  out_avals = tuple(jax.make_jaxpr(flat_fun)(*res_flat, *lin_flat).out_avals)
  out_tree = out_trees[0]
  maps = _Maps(flat_fun, flat_transpose, tuple(jax.typeof(x) for x in res_flat),
               tuple(jax.typeof(x) for x in lin_flat), out_avals,
               transpose_keep=flat_transpose_keep if transpose_needs else None,
               transpose_derivable=flat_transpose_derivable)
  out = _linear_call_p.bind(*res_flat, *lin_flat, maps=maps)
  return jax.tree.unflatten(out_tree, out)

