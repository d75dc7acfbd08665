"""distattn_jax.compat against the running jax: each name resolves to what this jax provides, and the mesh
functions see the mesh that ``compat.set_mesh`` sets."""

import re

import jax
import pytest

from distattn_jax import compat


def test_the_version_is_the_running_jax():
  assert compat.JAX_VERSION == tuple(int(n) for n in re.findall(r"\d+", jax.__version__)[:3])
  assert (0, 10) <= compat.JAX_VERSION[:2] < (0, 13)  # pyproject.toml's range
  assert compat.PALLAS_TRITON_DEPRECATED == (compat.JAX_VERSION >= (0, 11))


def test_the_mesh_functions_see_the_mesh_that_set_mesh_sets():
  mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  assert compat.get_abstract_mesh().empty
  with compat.set_mesh(mesh):
    assert compat.get_abstract_mesh() == mesh.abstract_mesh
    assert compat.get_mesh() == mesh
    with compat.use_abstract_mesh(jax.make_mesh((8,), ("seq",)).abstract_mesh):
      assert compat.get_abstract_mesh().axis_names == ("seq",)
    assert compat.get_abstract_mesh().axis_names == ("data", "seq")
  assert compat.get_abstract_mesh().empty


@pytest.mark.parametrize("name", ["get_abstract_mesh", "use_abstract_mesh", "get_mesh"])
def test_a_mesh_function_is_jax_own(name):
  # The top-level function where this jax has one (0.11 and later), else jax.sharding's: never a copy.
  expected = getattr(jax, name, None) or getattr(jax.sharding, name)
  assert compat._mesh_function(name) is expected  # pylint: disable=protected-access


def test_the_pallas_modules_hold_what_the_fused_kernel_uses():
  pl, triton = compat.pallas(), compat.pallas_triton()
  for name in ("pallas_call", "BlockSpec", "program_id", "ds"):
    assert callable(getattr(pl, name)), name
  assert triton.__name__ == "jax.experimental.pallas.triton"
  for name in ("CompilerParams", "dot"):
    assert callable(getattr(triton, name)), name
  assert pl.__name__ == ("jax.pallas" if compat.JAX_VERSION >= (0, 12, 1) else "jax.experimental.pallas")


def test_a_triton_kernel_lowers_for_a_gpu_without_one():
  # A one-tile Pallas kernel lowered for CUDA on this GPU-less machine: jax 0.11 and later need the abstract GPU
  # that gpu_lowering_target sets; jax 0.10 lowers for its fallback generation and needs nothing.
  pl = compat.pallas()

  def add_one(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1.0

  triton_params = compat.pallas_triton().CompilerParams(num_warps=4)  # the Triton backend, as the fused kernel
  fn = jax.jit(lambda x: pl.pallas_call(add_one, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                                        compiler_params=triton_params)(x))
  x = jax.ShapeDtypeStruct((16, 16), jax.numpy.float32)
  with compat.gpu_lowering_target("NVIDIA H100"):
    text = fn.trace(x).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 1
