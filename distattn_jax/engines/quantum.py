"""Three variational algorithms on the statevector simulator of :mod:`distattn_jax.engines.statevector`: QAOA
for MaxCut, VQE and a small variational classifier, and the ``quantum`` engine's stages that run and check them.

Every circuit is jit-compiled, batched over parameters with ``vmap``, differentiated by autodiff and optimised
with optax (several random starts at once, the best kept). The simulator's names (``apply_gate``, ``rx``,
``expectation``, ...) stay importable from here, so ``quantum.apply_gate`` and the like keep working.

Checks:
* QAOA at depth 1 on 3-regular graphs must reach an approximation ratio of at least 0.6924 (Farhi, Goldstone
  and Gutmann 2014, the worst case over 3-regular graphs at optimal angles); on triangle-free 3-regular graphs
  the optimum is known in closed form, ``(1/2 + 1/(3 sqrt 3)) |E|``, and is compared directly.
* VQE is compared with the lowest eigenvalue of the dense Hamiltonian (``numpy.linalg.eigvalsh``).
* The classifier's held-out accuracy must beat chance by a one-sided binomial test at p < 1e-3.

The module is long because each algorithm keeps its argument checks, its circuit, its optimisation and its
verification together with the engine stage that reports them; splitting them further would scatter one
algorithm over several files.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distattn_jax.engines import pipeline
# The simulator's public names are part of this module's interface too (quantum.apply_gate, quantum.rx, ...).
from distattn_jax.engines.statevector import (  # pylint: disable=unused-import
    PAULIS, apply_cnot, apply_gate, apply_pauli_rotation, apply_pauli_string, dense_hamiltonian, expectation,
    flip_qubit, pauli_action, rotate_all, rx, ry, rz, zero_state)

Array = jax.Array
# Live copies of the statevector one optimisation step of one start may hold (forward values kept for the
# backward pass, optimizer state, temporaries); a deliberately generous estimate for the memory check.
_COPIES_PER_STEP = 64


# --- checks ----------------------------------------------------------------------------------------------------

def _physical_memory() -> int:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return 16 << 30


def check_memory(num_qubits: int, batch: int, *, fn: str, copies: int = _COPIES_PER_STEP) -> None:
  """Raises before any work if ``batch`` statevectors of ``num_qubits`` (times the copies an optimisation step
  keeps) would not fit in this machine's memory, saying how much they would need."""
  if not isinstance(num_qubits, (int, np.integer)) or isinstance(num_qubits, bool) or num_qubits < 1:
    raise ValueError(f"{fn}: num_qubits={num_qubits!r} must be a positive int")
  need = 8 * 2 ** int(num_qubits) * batch * copies  # complex64 amplitudes
  have = _physical_memory()
  if need > have // 2:
    raise ValueError(f"{fn}: num_qubits={num_qubits} needs about {need / 2**30:,.1f} GiB ({batch} statevector(s) of "
                     f"2^{num_qubits} complex64 amplitudes = {8 * 2**num_qubits / 2**30:,.3g} GiB each, ~{copies} "
                     f"live copies per optimisation step); this machine has {have / 2**30:,.1f} GiB, of which "
                     "half may be used")


def parse_hamiltonian(hamiltonian, num_qubits: int, *, fn: str = "vqe") -> tuple[np.ndarray, tuple[str, ...]]:
  """``[(coefficient, "XZI..."), ...]`` -> (float64 coefficients, strings), checked."""
  if isinstance(hamiltonian, (str, bytes)) or not isinstance(hamiltonian, Sequence) or not hamiltonian:
    raise ValueError(f"{fn}: hamiltonian must be a non-empty list of (coefficient, pauli_string) pairs")
  coefficients, strings = [], []
  for i, term in enumerate(hamiltonian):
    try:
      coefficient, string = term
      coefficient = float(coefficient)
    except (TypeError, ValueError):
      raise ValueError(f"{fn}: hamiltonian[{i}]={term!r} is not a (real coefficient, pauli_string) pair") from None
    if not isinstance(string, str) or len(string) != num_qubits:
      raise ValueError(f"{fn}: hamiltonian[{i}] pauli string {string!r} must have length num_qubits={num_qubits}")
    bad = sorted(set(string.upper()) - set(PAULIS))
    if bad:
      raise ValueError(f"{fn}: hamiltonian[{i}] pauli string {string!r} has letters {bad}; allowed: I, X, Y, Z")
    if not math.isfinite(coefficient):
      raise ValueError(f"{fn}: hamiltonian[{i}] coefficient {coefficient!r} must be finite")
    coefficients.append(coefficient)
    strings.append(string.upper())
  return np.array(coefficients), tuple(strings)


def _best_of_starts(loss, init_params, steps: int, learning_rate) -> tuple[Array, Array]:
  """Adam on ``loss`` from every start (leading axis of the ``init_params`` pytree); returns final params and
  losses. A float ``learning_rate`` is cosine-decayed to 1% over ``steps``; an optax schedule is used as is."""
  if not callable(learning_rate):
    learning_rate = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.01)
  optimizer = optax.adam(learning_rate)
  value_and_grad = jax.value_and_grad(loss)

  def run(params):
    def step(carry, _):
      params, opt = carry
      _, grads = value_and_grad(params)
      updates, opt = optimizer.update(grads, opt, params)
      return (optax.apply_updates(params, updates), opt), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params, loss(params)

  return jax.vmap(run)(init_params)


# --- QAOA for MaxCut -------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class QaoaResult:
  expected_cut: float
  max_cut: float
  approximation_ratio: float
  best_bitstring: np.ndarray
  best_cut: float
  params: np.ndarray  # [depth, 2]: (gamma, beta) per layer
  num_edges: int


def _check_edges(edges, num_nodes) -> np.ndarray:
  if not isinstance(num_nodes, (int, np.integer)) or isinstance(num_nodes, bool) or num_nodes < 2:
    raise ValueError(f"qaoa_maxcut: num_nodes={num_nodes!r} must be an int >= 2")
  array = np.asarray(edges)
  if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] == 0 or not np.issubdtype(array.dtype, np.integer):
    raise ValueError(f"qaoa_maxcut: edges must be a non-empty list of (u, v) integer pairs; got shape "
                     f"{array.shape}, dtype {array.dtype}")
  if array.min() < 0 or array.max() >= num_nodes:
    raise ValueError(f"qaoa_maxcut: edges name nodes outside 0..{num_nodes - 1}: {array.min()}..{array.max()}")
  if np.any(array[:, 0] == array[:, 1]):
    raise ValueError("qaoa_maxcut: edges contain self-loops, which no cut can cut")
  return array.astype(np.int64)


def cut_values(edges: np.ndarray, num_nodes: int) -> np.ndarray:
  """The cut of every assignment, indexed like the statevector (qubit 0 = most significant bit)."""
  z = np.arange(2 ** num_nodes, dtype=np.int64)
  bits = (z[:, None] >> (num_nodes - 1 - np.arange(num_nodes))[None, :]) & 1
  return (bits[:, edges[:, 0]] != bits[:, edges[:, 1]]).sum(axis=1).astype(np.float32)


def qaoa_state(params: Array, cut: Array, num_nodes: int) -> Array:
  """``prod_l exp(-i beta_l B) exp(-i gamma_l C) |+>^n`` as a flat statevector; ``params [depth, 2]``."""
  state = jnp.full(cut.shape, 2.0 ** (-num_nodes / 2), jnp.complex64)
  for layer in range(params.shape[0]):
    gamma, beta = params[layer, 0], params[layer, 1]
    state = state * jnp.exp(-1j * gamma * cut)
    c, s = jnp.cos(beta).astype(jnp.complex64), jnp.sin(beta).astype(jnp.complex64)

    def mix_last(state, _):
      # exp(-i beta X) = cos(beta) I - i sin(beta) X on the last qubit, then the last qubit moved to the front:
      # after num_nodes steps every qubit was mixed once and the order is back. One body for all qubits
      # compiles once (a Python loop over qubits compiles num_nodes differently shaped copies).
      view = state.reshape(-1, 2)
      view = c * view - 1j * s * jnp.flip(view, axis=1)
      return view.T.reshape(-1), None

    state, _ = jax.lax.scan(mix_last, state, None, length=num_nodes)
  return state


@functools.partial(jax.jit, static_argnames=("num_nodes", "steps"))
def _qaoa_optimise(init, cut, *, num_nodes: int, steps: int):
  def loss(params):
    probabilities = jnp.abs(qaoa_state(params, cut, num_nodes)) ** 2
    return -jnp.sum(probabilities * cut)

  return _best_of_starts(loss, init, steps, 0.05)


def qaoa_maxcut(edges, num_nodes, *, depth=1, steps=200, seed=0, num_starts: int = 8,
                top_samples: int = 16) -> QaoaResult:
  """QAOA of ``depth`` layers for MaxCut on the graph ``edges`` (pairs of node indices).

  Angles from ``num_starts`` random starts, Adam for ``steps``; ``max_cut`` by enumerating all ``2^n`` cuts;
  ``best_bitstring`` is the best cut among the ``top_samples`` most probable measurement outcomes.
  """
  edges = _check_edges(edges, num_nodes)
  if not isinstance(depth, int) or depth < 1:
    raise ValueError(f"qaoa_maxcut: depth={depth!r} must be a positive int")
  check_memory(num_nodes, num_starts, fn="qaoa_maxcut", copies=4 * depth + 8)
  cut = cut_values(edges, num_nodes)
  rng = np.random.default_rng(seed)
  init = np.stack([rng.uniform(0, np.pi, (num_starts, depth)), rng.uniform(0, np.pi / 2, (num_starts, depth))], -1)
  params, losses = _qaoa_optimise(jnp.asarray(init, jnp.float32), jnp.asarray(cut), num_nodes=num_nodes,
                                  steps=steps)
  best = int(jnp.argmin(losses))
  params = np.asarray(params[best])
  probabilities = np.abs(np.asarray(qaoa_state(jnp.asarray(params), jnp.asarray(cut), num_nodes))) ** 2
  expected = float(np.dot(probabilities.astype(np.float64), cut))
  top = np.argsort(-probabilities)[:top_samples]
  index = int(top[np.argmax(cut[top])])
  bitstring = (index >> (num_nodes - 1 - np.arange(num_nodes))) & 1
  max_cut = float(cut.max())
  return QaoaResult(expected, max_cut, expected / max_cut, bitstring.astype(np.int64), float(cut[index]), params,
                    int(edges.shape[0]))


def is_regular(edges: np.ndarray, num_nodes: int, degree: int) -> bool:
  return bool(np.all(np.bincount(np.asarray(edges).reshape(-1), minlength=num_nodes) == degree))


def is_triangle_free(edges: np.ndarray, num_nodes: int) -> bool:
  adjacency = np.zeros((num_nodes, num_nodes), np.int64)
  adjacency[edges[:, 0], edges[:, 1]] = adjacency[edges[:, 1], edges[:, 0]] = 1
  return int(np.trace(adjacency @ adjacency @ adjacency)) == 0


def random_regular_graph(num_nodes: int, degree: int, seed: int) -> np.ndarray:
  """A simple ``degree``-regular graph by the pairing model, redrawn until simple (numpy, seeded)."""
  if num_nodes * degree % 2 or degree >= num_nodes:
    raise ValueError(f"random_regular_graph: no simple {degree}-regular graph on {num_nodes} nodes")
  rng = np.random.default_rng(seed)
  for _ in range(10000):
    stubs = rng.permutation(np.repeat(np.arange(num_nodes), degree)).reshape(-1, 2)
    pairs = np.sort(stubs, axis=1)
    if np.all(pairs[:, 0] != pairs[:, 1]) and len({tuple(p) for p in pairs}) == len(pairs):
      return pairs
  raise RuntimeError("random_regular_graph: no simple pairing found")


def verify_qaoa(result: QaoaResult, edges, num_nodes: int, depth: int) -> list[pipeline.Check]:
  edges = np.asarray(edges)
  checks = [pipeline.check("qaoa.cut_consistency", "best sampled cut <= exact max cut (enumeration)",
                           result.best_cut - result.max_cut, 0.0),
            pipeline.check("qaoa.beats_random", "expected cut >= |E|/2 (random assignment, and QAOA at gamma=0)",
                           result.expected_cut - edges.shape[0] / 2, -1e-4, at_least=True)]
  if depth == 1 and is_regular(edges, num_nodes, 3):
    checks.append(pipeline.check("qaoa.farhi_bound", "approximation ratio on a 3-regular graph >= 0.6924 "
                                 "(Farhi, Goldstone, Gutmann 2014, depth 1)", result.approximation_ratio, 0.6924,
                                 at_least=True))
    if is_triangle_free(edges, num_nodes):
      exact = (0.5 + 1 / (3 * math.sqrt(3))) * edges.shape[0]
      checks.append(pipeline.check("qaoa.triangle_free_optimum", "|expected cut - (1/2 + 1/(3 sqrt 3))|E||, the "
                                   "closed-form depth-1 optimum on triangle-free 3-regular graphs",
                                   abs(result.expected_cut - exact), 1e-3 * edges.shape[0]))
  return checks


# --- VQE -------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VqeResult:
  energy: float
  exact_energy: float
  params: dict  # "rotations" [layers + 1, num_qubits, 3] (rz, ry, rz); "terms" [layers, num_terms] (theta_k)


def ansatz_state(params: dict, num_qubits: int, strings: Sequence[str], reference: int = 0) -> Array:
  """Hamiltonian-variational ansatz with free single-qubit rotations.

  From the basis state ``reference`` (its index, qubit 0 most significant): general rotations on every qubit,
  then per layer ``exp(-i theta_k P_k)`` for each of the Hamiltonian's own Pauli terms ``P_k`` in order, each
  with its own angle, followed by general rotations again. The entanglers are the Hamiltonian's terms, so the
  circuit is generic over Pauli Hamiltonians and its layers follow the structure of the ground state (a
  Trotterised adiabatic path is one point of it). Layers run under ``lax.scan``: one layer compiles once.
  """
  state = jnp.zeros((2 ** num_qubits,), jnp.complex64).at[reference].set(1.0)
  state = rotate_all(state, params["rotations"][0])

  def layer(state, angles):
    terms, rotations = angles
    for k, string in enumerate(strings):
      state = apply_pauli_rotation(state, terms[k], string)
    return rotate_all(state, rotations), None

  if params["terms"].shape[0]:
    state, _ = jax.lax.scan(layer, state, (params["terms"], params["rotations"][1:]))
  return state


def _diagonal_reference(coefficients: np.ndarray, strings: Sequence[str], num_qubits: int) -> int:
  """The basis state of lowest energy under the Hamiltonian's diagonal (its I/Z-only terms); 0 if none."""
  z = np.arange(2 ** num_qubits, dtype=np.int64)
  bits = (z[:, None] >> (num_qubits - 1 - np.arange(num_qubits))[None, :]) & 1
  signs = 1 - 2 * bits  # Z eigenvalue per qubit
  energy = np.zeros(2 ** num_qubits)
  for c, string in zip(coefficients, strings):
    if set(string) <= {"I", "Z"}:
      mask = np.array([letter == "Z" for letter in string])
      energy += c * np.prod(signs[:, mask], axis=1)
  return int(np.argmin(energy))


@functools.partial(jax.jit, static_argnames=("strings", "generators", "num_qubits", "steps", "reference"))
def _vqe_optimise(init, coefficients, *, strings, generators, num_qubits: int, steps: int, reference: int):
  def loss(params):
    return expectation(ansatz_state(params, num_qubits, generators, reference), coefficients, strings)

  schedule = optax.warmup_cosine_decay_schedule(0.0, 0.05, max(1, steps // 20), steps, end_value=5e-4)
  return _best_of_starts(loss, init, steps, schedule)


def vqe(hamiltonian, num_qubits, *, layers=4, steps=500, seed=0, restarts: int = 8) -> VqeResult:
  """Ground-state energy of ``hamiltonian`` (list of ``(coefficient, pauli_string)``; character ``i`` acts on
  qubit ``i``) by the Hamiltonian-variational ansatz of ``layers`` layers (see ``ansatz_state``), best of
  ``restarts`` random starts optimised together; ``exact_energy`` by dense diagonalisation (``num_qubits <= 12``,
  else NaN)."""
  if not isinstance(num_qubits, (int, np.integer)) or isinstance(num_qubits, bool) or num_qubits < 1:
    raise ValueError(f"vqe: num_qubits={num_qubits!r} must be a positive int")
  coefficients, strings = parse_hamiltonian(hamiltonian, num_qubits)
  if not isinstance(layers, int) or layers < 0:
    raise ValueError(f"vqe: layers={layers!r} must be an int >= 0")
  if not isinstance(restarts, int) or restarts < 1:
    raise ValueError(f"vqe: restarts={restarts!r} must be a positive int")
  check_memory(num_qubits, restarts, fn="vqe", copies=2 * (layers + 1) * (len(strings) + 3 * num_qubits) + 8)
  keep = tuple(i for i, string in enumerate(strings) if set(string) != {"I"})  # identity terms: a constant
  active = tuple(strings[i] for i in keep)
  reference = _diagonal_reference(coefficients, strings, num_qubits)
  rng = np.random.default_rng(seed)
  # Small angles around the reference basis state: the circuit starts near the state of lowest diagonal energy
  # and the term angles grow entanglement from there.
  init = {"rotations": rng.normal(0.0, 0.1, (restarts, layers + 1, num_qubits, 3)),
          "terms": rng.normal(0.0, 0.1, (restarts, layers, len(active)))}
  init = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), init)
  params, energies = _vqe_optimise(init, jnp.asarray(coefficients, jnp.float32), strings=strings,
                                   generators=active, num_qubits=num_qubits, steps=steps, reference=reference)
  best = int(jnp.argmin(energies))
  params = jax.tree.map(lambda a: np.asarray(a[best]), params)
  state = np.asarray(ansatz_state(jax.tree.map(jnp.asarray, params), num_qubits, active, reference))
  state = state.astype(np.complex128)
  exact = float("nan")
  if num_qubits <= 12:
    matrix = dense_hamiltonian(coefficients, strings)
    exact = float(np.linalg.eigvalsh(matrix)[0])
    energy = float(np.real(np.vdot(state, matrix @ state)) / np.real(np.vdot(state, state)))
  else:
    energy = float(energies[best])
  return VqeResult(energy, exact, params)


def transverse_field_ising(num_qubits: int, field: float = 1.0, coupling: float = 1.0) -> list[tuple[float, str]]:
  """Open chain ``-J sum Z_i Z_{i+1} - h sum X_i``."""
  terms = []
  for i in range(num_qubits - 1):
    terms.append((-coupling, "I" * i + "ZZ" + "I" * (num_qubits - i - 2)))
  for i in range(num_qubits):
    terms.append((-field, "I" * i + "X" + "I" * (num_qubits - i - 1)))
  return terms


def heisenberg(num_qubits: int, coupling: float = 1.0) -> list[tuple[float, str]]:
  """Open chain ``J sum (X_i X_{i+1} + Y_i Y_{i+1} + Z_i Z_{i+1})``."""
  return [(coupling, "I" * i + p + p + "I" * (num_qubits - i - 2)) for i in range(num_qubits - 1) for p in "XYZ"]


# --- a variational classifier -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class QnnResult:
  train_accuracy: float
  test_accuracy: float
  num_train: int
  num_test: int
  p_value: float  # one-sided binomial test of the test accuracy against chance (1/2)
  params: np.ndarray


def circles_dataset(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Points uniform in [-1, 1]^2, label 1 inside the circle of radius sqrt(2/pi) (half the square's area)."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (num_examples, 2)).astype(np.float32)
  y = (np.sum(x ** 2, axis=1) < 2 / np.pi).astype(np.int32)
  return x, y


def classifier_score(params: Array, x: Array, num_qubits: int) -> Array:
  """Data re-uploading circuit: per layer RY(w * x_j) on qubit j mod 2, trainable RY RZ, CNOT chain; the score
  is ``<Z_0>``. ``params [layers, num_qubits, 4]``: (input weight, input bias, ry, rz)."""
  state = zero_state(num_qubits)
  inputs = jnp.take(x, jnp.asarray(np.arange(num_qubits) % x.shape[0]))  # [num_qubits]
  for layer in range(params.shape[0]):
    p = params[layer]
    # RZ(p3) RY(p2) RY(p0 x + p1) = RZ(p3) RY(p0 x + p1 + p2) RZ(0): one matrix per qubit, all built at once.
    angle = p[:, 0] * inputs + p[:, 1] + p[:, 2]
    state = rotate_all(state, jnp.stack([jnp.zeros_like(angle), angle, p[:, 3]], -1))
    for q in range(num_qubits - 1):
      state = apply_cnot(state, q, q + 1)
  return jnp.real(jnp.vdot(state, apply_pauli_string(state, "Z" + "I" * (num_qubits - 1))))


@functools.partial(jax.jit, static_argnames=("num_qubits", "steps"))
def _train_classifier(init, x, y, *, num_qubits: int, steps: int):
  def loss(params):
    logits = 4.0 * jax.vmap(lambda xi: classifier_score(params, xi, num_qubits))(x)
    return optax.sigmoid_binary_cross_entropy(logits, y.astype(jnp.float32)).mean()

  return _best_of_starts(loss, init, steps, 0.05)


def qnn_classifier(*, num_train: int = 200, num_test: int = 200, num_qubits: int = 2, layers: int = 3,
                   steps: int = 300, seed: int = 0, restarts: int = 2) -> QnnResult:
  """Trains the classifier on the circles dataset and measures held-out accuracy."""
  from scipy import stats  # only the verification's binomial test needs scipy

  check_memory(num_qubits, restarts * num_train, fn="qnn_classifier")
  x, y = circles_dataset(num_train + num_test, seed)
  rng = np.random.default_rng(seed + 1)
  init = rng.normal(0.0, 1.0, (restarts, layers, num_qubits, 4)).astype(np.float32)
  init[..., 0] = np.abs(init[..., 0]) + np.pi / 2  # input weights: start with angles that span the data
  params, losses = _train_classifier(jnp.asarray(init), jnp.asarray(x[:num_train]), jnp.asarray(y[:num_train]),
                                     num_qubits=num_qubits, steps=steps)
  params = params[int(jnp.argmin(losses))]
  score = jax.jit(jax.vmap(lambda xi: classifier_score(params, xi, num_qubits)))
  predictions = np.asarray(score(jnp.asarray(x)) > 0).astype(np.int32)
  correct_test = int(np.sum(predictions[num_train:] == y[num_train:]))
  p_value = float(stats.binomtest(correct_test, num_test, 0.5, alternative="greater").pvalue)
  return QnnResult(float(np.mean(predictions[:num_train] == y[:num_train])), correct_test / num_test, num_train,
                   num_test, p_value, np.asarray(params))


# --- the engine: stages and report ------------------------------------------------------------------------------

@pipeline.register("quantum", "qaoa")
def qaoa_stage(num_nodes: int = 10, degree: int = 3, graph_seed: int = 0, depth: int = 1, steps: int = 200,
               seed: int = 0) -> pipeline.Stage:
  """QAOA MaxCut on a random ``degree``-regular graph (numpy, seeded), with its checks."""

  def stage(state):
    edges = random_regular_graph(num_nodes, degree, graph_seed)
    result = qaoa_maxcut(edges, num_nodes, depth=depth, steps=steps, seed=seed)
    state = pipeline.with_result(state, "qaoa", {"graph": f"random {degree}-regular, {num_nodes} nodes, seed "
                                                 f"{graph_seed}", "edges": edges, **dataclasses.asdict(result)})
    for entry in verify_qaoa(result, edges, num_nodes, depth):
      state = pipeline.with_check(state, entry)
    return state

  return stage


@pipeline.register("quantum", "vqe")
def vqe_stage(model: str = "ising", num_qubits: int = 6, layers: int = 0, steps: int = 1500, seed: int = 0,
              tolerance: float = 1e-3) -> pipeline.Stage:
  """VQE on a transverse-field Ising (``h = J = 1``) or Heisenberg open chain; ``layers=0`` means num_qubits."""
  builders = {"ising": transverse_field_ising, "heisenberg": heisenberg}
  if model not in builders:
    raise ValueError(f"quantum.vqe: model={model!r} must be one of {', '.join(builders)}")

  def stage(state):
    result = vqe(builders[model](num_qubits), num_qubits, layers=layers or num_qubits, steps=steps, seed=seed)
    state = pipeline.with_result(state, "vqe", {"model": model, "num_qubits": num_qubits, **dataclasses.asdict(result),
                                                "error": result.energy - result.exact_energy})
    return pipeline.with_check(state, pipeline.check(
        "quantum.vqe", "VQE energy - exact ground energy (dense diagonalisation)", result.energy - result.exact_energy,
        tolerance))

  return stage


@pipeline.register("quantum", "qnn")
def qnn_stage(num_train: int = 200, num_test: int = 200, num_qubits: int = 2, layers: int = 3, steps: int = 300,
              seed: int = 0) -> pipeline.Stage:
  def stage(state):
    result = qnn_classifier(num_train=num_train, num_test=num_test, num_qubits=num_qubits, layers=layers,
                            steps=steps, seed=seed)
    state = pipeline.with_result(state, "qnn", {"dataset": "circles (numpy, seeded)", **dataclasses.asdict(result)})
    return pipeline.with_check(state, pipeline.check(
        "quantum.qnn", f"one-sided binomial p-value of the held-out accuracy {result.test_accuracy:.3f} on "
        f"{num_test} points against chance (1/2)", result.p_value, 1e-3))

  return stage


def default_config():
  import ml_collections

  c = ml_collections.ConfigDict()
  c.engine = "quantum"
  c.stages = "qaoa,vqe,qnn"
  c.qaoa = ml_collections.ConfigDict({"num_nodes": 10, "degree": 3, "graph_seed": 0, "depth": 1, "steps": 200,
                                      "seed": 0})
  c.vqe = ml_collections.ConfigDict({"model": "ising", "num_qubits": 6, "layers": 0, "steps": 1500, "seed": 0})
  c.qnn = ml_collections.ConfigDict({"num_train": 200, "num_test": 200, "steps": 300, "seed": 0})
  return c


run = pipeline.run  # the report of default_config() (or a user's config of this engine's stages)
