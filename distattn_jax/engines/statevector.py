"""A statevector simulator in JAX: the state of ``n`` qubits, the gates that act on it and the expectation
values read from it; :mod:`distattn_jax.engines.quantum` builds its algorithms on these names.

The state of ``n`` qubits is a flat complex64 array of ``2^n`` amplitudes whose index has qubit 0 as its most
significant bit, the order of ``np.kron(op_0, op_1, ...)``. A gate on qubit ``q`` views the state as
``[2^q, 2, 2^(n-q-1)]`` and contracts its 2x2 matrix into the middle axis (rank-3 views keep XLA's compile
time small; rank-n tensors of 2s make it minutes). Every function is pure and traceable, so the algorithms jit,
``vmap`` and differentiate through it.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PAULIS = "IXYZ"
_MATRICES = {
    "I": np.eye(2, dtype=np.complex64),
    "X": np.array([[0, 1], [1, 0]], np.complex64),
    "Y": np.array([[0, -1j], [1j, 0]], np.complex64),
    "Z": np.array([[1, 0], [0, -1]], np.complex64),
}


# --- the state -------------------------------------------------------------------------------------------------

def zero_state(num_qubits: int) -> Array:
  return jnp.zeros((2 ** num_qubits,), jnp.complex64).at[0].set(1.0)


def _num_qubits(state: Array) -> int:
  return int(state.shape[-1]).bit_length() - 1


def _view(state: Array, qubit: int) -> Array:
  n = _num_qubits(state)
  return state.reshape(2 ** qubit, 2, 2 ** (n - qubit - 1))


# --- gates -----------------------------------------------------------------------------------------------------

def apply_gate(state: Array, gate: Array, qubit: int) -> Array:
  """A 2x2 ``gate`` on ``qubit`` of a flat statevector."""
  return jnp.einsum("ij,ajb->aib", gate, _view(state, qubit)).reshape(state.shape)


def apply_cnot(state: Array, control: int, target: int) -> Array:
  """CNOT: where ``control`` is 1, flip ``target`` (``control < target``)."""
  n = _num_qubits(state)
  view = state.reshape(2 ** control, 2, 2 ** (target - control - 1), 2, 2 ** (n - target - 1))
  flipped = jnp.flip(view[:, 1:], axis=3)
  return jnp.concatenate([view[:, :1], flipped], axis=1).reshape(state.shape)


def flip_qubit(state: Array, qubit: int) -> Array:
  """Pauli X on ``qubit``."""
  return jnp.flip(_view(state, qubit), axis=1).reshape(state.shape)


def rx(theta: Array) -> Array:
  c, s = jnp.cos(theta / 2).astype(jnp.complex64), jnp.sin(theta / 2).astype(jnp.complex64)
  return jnp.stack([jnp.stack([c, -1j * s]), jnp.stack([-1j * s, c])])


def ry(theta: Array) -> Array:
  c, s = jnp.cos(theta / 2).astype(jnp.complex64), jnp.sin(theta / 2).astype(jnp.complex64)
  return jnp.stack([jnp.stack([c, -s]), jnp.stack([s, c])])


def rz(theta: Array) -> Array:
  phase = jnp.exp(-0.5j * theta.astype(jnp.complex64))
  zero = jnp.zeros((), jnp.complex64)
  return jnp.stack([jnp.stack([phase, zero]), jnp.stack([zero, jnp.conj(phase)])])


def pauli_action(string: str) -> tuple[np.ndarray, np.ndarray]:
  """``(P psi)[z] = phase[z] * psi[z ^ m]``: the flipped indices ``z ^ m`` (``m`` marks X and Y) and the phases
  (``-i`` / ``+i`` for Y on bit 0 / 1, ``+1`` / ``-1`` for Z), as numpy constants. One gather and one product
  per string instead of a gate per letter keeps the traced graph, and XLA's compile time, small."""
  n = len(string)
  z = np.arange(2 ** n, dtype=np.int64)
  bits = (z[:, None] >> (n - 1 - np.arange(n))[None, :]) & 1
  mask = sum(1 << (n - 1 - q) for q, letter in enumerate(string) if letter in "XY")
  phase = np.ones(2 ** n, np.complex128)
  for q, letter in enumerate(string):
    if letter == "Y":
      phase = phase * 1j * (2 * bits[:, q] - 1)
    elif letter == "Z":
      phase = phase * (1 - 2 * bits[:, q])
  return (z ^ mask).astype(np.int32), phase.astype(np.complex64)


def apply_pauli_string(state: Array, string: str) -> Array:
  flip, phase = pauli_action(string)
  return jnp.asarray(phase) * jnp.take(state, jnp.asarray(flip), axis=-1)


def apply_pauli_rotation(state: Array, theta: Array, string: str) -> Array:
  """``exp(-i theta P) |psi> = cos(theta) |psi> - i sin(theta) P |psi>`` for a Pauli string ``P`` (P^2 = I)."""
  c, s = jnp.cos(theta).astype(jnp.complex64), jnp.sin(theta).astype(jnp.complex64)
  return c * state - 1j * s * apply_pauli_string(state, string)


def rotate_all(state: Array, angles: Array) -> Array:
  """``RZ(c) RY(b) RZ(a)`` (a general single-qubit unitary up to phase) on every qubit; ``angles
  [num_qubits, 3]`` holds ``(a, b, c)``. The 2x2 matrices of all qubits are built at once."""
  a, b, c = (angles[:, i].astype(jnp.complex64) for i in range(3))
  cos, sin = jnp.cos(b / 2), jnp.sin(b / 2)
  plus, minus = jnp.exp(-0.5j * (a + c)), jnp.exp(0.5j * (a - c))
  gates = jnp.stack([jnp.stack([plus * cos, -minus * sin], -1),
                     jnp.stack([jnp.conj(minus) * sin, jnp.conj(plus) * cos], -1)], -2)  # [num_qubits, 2, 2]
  for q in range(angles.shape[0]):
    state = apply_gate(state, gates[q], q)
  return state


# --- measurement -----------------------------------------------------------------------------------------------

def expectation(state: Array, coefficients: Array, strings: Sequence[str]) -> Array:
  """``<psi| sum_k c_k P_k |psi>`` (real) for a normalised ``state``: terms that flip the same qubits share one
  gather, their phases weighted by the coefficients into one vector."""
  groups: dict[int, list[int]] = {}
  actions = [pauli_action(string) for string in strings]
  for k, (flip, _) in enumerate(actions):
    groups.setdefault(int(flip[0]), []).append(k)
  total = jnp.zeros((), jnp.float32)
  for first, members in groups.items():
    phases = jnp.asarray(np.stack([actions[k][1] for k in members]))  # [terms, 2^n]
    weights = jnp.take(coefficients, jnp.asarray(members)).astype(jnp.complex64)
    diagonal = weights @ phases
    flipped = state if first == 0 else jnp.take(state, jnp.asarray(actions[members[0]][0]), axis=-1)
    total = total + jnp.real(jnp.vdot(state, diagonal * flipped))
  return total


def dense_hamiltonian(coefficients: np.ndarray, strings: Sequence[str]) -> np.ndarray:
  """The Hamiltonian as a dense complex128 matrix (``np.kron`` in qubit order)."""
  n = len(strings[0])
  matrix = np.zeros((2 ** n, 2 ** n), np.complex128)
  for c, string in zip(coefficients, strings):
    term = np.ones((1, 1), np.complex128)
    for letter in string:
      term = np.kron(term, _MATRICES[letter].astype(np.complex128))
    matrix += c * term
  return matrix
