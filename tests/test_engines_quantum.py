"""The statevector simulator against dense Kronecker-product matrices in numpy, and the three algorithms against
exact answers: QAOA (closed-form depth-1 optimum, Farhi et al.'s bound), VQE (dense diagonalisation), the
classifier (binomial test against chance)."""

import functools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from distattn_jax.engines import quantum, statevector

PAULI = {"I": np.eye(2), "X": np.array([[0, 1], [1, 0]]), "Y": np.array([[0, -1j], [1j, 0]]),
         "Z": np.diag([1.0, -1.0])}
CUBE = [(0, 1), (1, 3), (3, 2), (2, 0), (4, 5), (5, 7), (7, 6), (6, 4), (0, 4), (1, 5), (2, 6), (3, 7)]
PETERSEN = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0), (0, 5), (1, 6), (2, 7), (3, 8), (4, 9), (5, 7), (7, 9), (9, 6),
            (6, 8), (8, 5)]


def kron(*ops):
  return functools.reduce(np.kron, ops, np.eye(1))


def random_state(n, seed):
  rng = np.random.default_rng(seed)
  v = rng.standard_normal(2 ** n) + 1j * rng.standard_normal(2 ** n)
  return v / np.linalg.norm(v)


def test_gates_match_kronecker_products():
  # Each gate on qubit q of 3 equals kron(I.., G, ..I) acting on the flat vector (qubit 0 most significant).
  n, psi = 3, random_state(3, 0)
  theta = 0.7
  rot = {"rx": np.array([[np.cos(theta / 2), -1j * np.sin(theta / 2)], [-1j * np.sin(theta / 2), np.cos(theta / 2)]]),
         "ry": np.array([[np.cos(theta / 2), -np.sin(theta / 2)], [np.sin(theta / 2), np.cos(theta / 2)]]),
         "rz": np.diag([np.exp(-0.5j * theta), np.exp(0.5j * theta)])}
  for q in range(n):
    for name, matrix in rot.items():
      gate = getattr(quantum, name)(jnp.float32(theta))
      got = np.asarray(quantum.apply_gate(jnp.asarray(psi, jnp.complex64), gate, q))
      ops = [np.eye(2)] * n
      ops[q] = matrix
      np.testing.assert_allclose(got, kron(*ops) @ psi, atol=2e-6)  # complex64 round-off
  cnot = np.eye(4)[[0, 1, 3, 2]]
  swap = np.eye(4)[[0, 2, 1, 3]]
  expected = {(0, 1): kron(cnot, np.eye(2)), (1, 2): kron(np.eye(2), cnot),
              (0, 2): kron(swap, np.eye(2)) @ kron(np.eye(2), cnot) @ kron(swap, np.eye(2))}
  for (c, t), matrix in expected.items():
    got = np.asarray(quantum.apply_cnot(jnp.asarray(psi, jnp.complex64), c, t))
    np.testing.assert_allclose(got, matrix @ psi, atol=2e-6)


def test_expectation_matches_dense_hamiltonian():
  # <psi|H|psi> from the simulator against a dense Hamiltonian built here from np.kron (not quantum's builder).
  n = 4
  hamiltonian = [(0.5, "XZIY"), (-1.2, "ZZII"), (0.3, "IYYI"), (2.0, "IIIX"), (0.7, "IIII")]
  coefficients, strings = quantum.parse_hamiltonian(hamiltonian, n)
  dense = sum(c * kron(*[PAULI[ch] for ch in s]) for c, s in hamiltonian)
  np.testing.assert_allclose(quantum.dense_hamiltonian(coefficients, strings), dense, atol=1e-12)
  for seed in range(3):
    psi = random_state(n, seed)
    got = float(quantum.expectation(jnp.asarray(psi, jnp.complex64), jnp.asarray(coefficients, jnp.float32),
                                    strings))
    assert abs(got - np.real(psi.conj() @ dense @ psi)) < 1e-5  # 5 terms of complex64 inner products


def test_ansatz_gates_match_matrix_exponentials():
  # exp(-i theta P) against scipy's expm of the np.kron matrix; the all-qubit RZ(c) RY(b) RZ(a) against the
  # Kronecker product of the three rotation matrices per qubit.
  from scipy.linalg import expm

  n, psi = 3, random_state(3, 1)
  for string in ("XYZ", "IYY", "ZIZ"):
    dense = kron(*[PAULI[ch] for ch in string])
    got = np.asarray(quantum.apply_pauli_rotation(jnp.asarray(psi, jnp.complex64), jnp.float32(0.37), string))
    np.testing.assert_allclose(got, expm(-0.37j * dense) @ psi, atol=2e-6)  # complex64 round-off
  angles = np.random.default_rng(2).uniform(-np.pi, np.pi, (n, 3))
  rz = lambda t: np.diag([np.exp(-0.5j * t), np.exp(0.5j * t)])
  ry = lambda t: np.array([[np.cos(t / 2), -np.sin(t / 2)], [np.sin(t / 2), np.cos(t / 2)]])
  unitary = kron(*[rz(c) @ ry(b) @ rz(a) for a, b, c in angles])
  got = np.asarray(statevector.rotate_all(jnp.asarray(psi, jnp.complex64), jnp.asarray(angles, jnp.float32)))
  np.testing.assert_allclose(got, unitary @ psi, atol=2e-6)


def test_the_simulators_names_stay_importable_from_quantum():
  # quantum re-exports the simulator it is built on; code written against quantum.apply_gate & co. keeps working.
  names = ("PAULIS", "apply_cnot", "apply_gate", "apply_pauli_rotation", "apply_pauli_string", "dense_hamiltonian",
           "expectation", "flip_qubit", "pauli_action", "rotate_all", "rx", "ry", "rz", "zero_state")
  for name in names:
    assert getattr(quantum, name) is getattr(statevector, name), name


@pytest.mark.parametrize("edges,n", [(CUBE, 8), (PETERSEN, 10)], ids=["cube", "petersen"])
def test_qaoa_depth1_reaches_the_closed_form_optimum_and_farhi_bound(edges, n):
  # Triangle-free 3-regular graphs: the optimal depth-1 expected cut is (1/2 + 1/(3 sqrt 3)) |E| per edge
  # (Farhi, Goldstone, Gutmann 2014); the cube's max cut is 12 (bipartite), the Petersen graph's 12.
  result = quantum.qaoa_maxcut(edges, n, depth=1, steps=200, seed=0)
  assert result.max_cut == 12.0
  assert abs(result.expected_cut - (0.5 + 1 / (3 * math.sqrt(3))) * len(edges)) < 1e-3 * len(edges)
  assert result.approximation_ratio >= 0.6924
  bits = np.asarray(result.best_bitstring)
  assert bits.shape == (n,) and set(bits.tolist()) <= {0, 1}
  assert result.best_cut == sum(bits[u] != bits[v] for u, v in edges) and result.best_cut <= result.max_cut
  assert all(c.passed for c in quantum.verify_qaoa(result, np.array(edges), n, 1))


def test_qaoa_max_cut_by_enumeration_matches_brute_force():
  edges = quantum.random_regular_graph(6, 3, seed=1)
  brute = max(sum(((z >> (5 - u)) & 1) != ((z >> (5 - v)) & 1) for u, v in edges) for z in range(64))
  assert quantum.cut_values(edges, 6).max() == brute


@pytest.mark.parametrize("model", ["ising", pytest.param("heisenberg", marks=pytest.mark.slow)])
def test_vqe_reaches_the_exact_ground_energy(model):
  # 4 qubits with the verified settings (layers = num_qubits, 1500 steps): within 1e-3 of the lowest eigenvalue
  # of the dense matrix (built here with np.kron, independently of the engine). Measured: errors 4.8e-6 (Ising),
  # 3.0e-7 (Heisenberg); the 1500 steps cost ~0.5 s, the compile ~4 s.
  n = 4
  hamiltonian = quantum.transverse_field_ising(n) if model == "ising" else quantum.heisenberg(n)
  dense = sum(c * kron(*[PAULI[ch] for ch in s]) for c, s in hamiltonian)
  result = quantum.vqe(hamiltonian, n, layers=n, steps=1500, seed=0)
  assert abs(result.exact_energy - np.linalg.eigvalsh(dense)[0]) < 1e-9
  assert result.energy >= result.exact_energy - 1e-6  # variational: never below the ground energy
  assert result.energy - result.exact_energy < 1e-3


def test_classifier_beats_chance_on_held_out_points():
  # 200 held-out points; accuracy >= 0.75 has a binomial p-value below 1e-12 against a coin flip.
  result = quantum.qnn_classifier(num_train=200, num_test=200, seed=0)
  assert result.test_accuracy >= 0.75 and result.p_value < 1e-3


@pytest.mark.parametrize("hamiltonian,match", [
    ([(1.0, "XZ")], "must have length num_qubits=3"),
    ([(1.0, "XZA")], r"has letters \['A'\]; allowed: I, X, Y, Z"),
    ([("a", "XZI")], "is not a \\(real coefficient, pauli_string\\) pair"),
    ([], "non-empty list"),
])
def test_vqe_rejects_bad_hamiltonians(hamiltonian, match):
  with pytest.raises(ValueError, match=match):
    quantum.vqe(hamiltonian, 3)


def test_too_many_qubits_says_how_much_memory_they_need():
  with pytest.raises(ValueError, match=r"num_qubits=40 needs about [\d,]+\.\d GiB .* this machine has"):
    quantum.vqe([(1.0, "Z" * 40)], 40)
  with pytest.raises(ValueError, match="edges name nodes outside"):
    quantum.qaoa_maxcut([(0, 5)], 3)
