"""ListOps (Long Range Arena): nested MIN / MAX / MED / SM expressions over the digits 0-9, classified by value.

:func:`generate` follows LRA's generator: an argument is a nested operator with probability ``VALUE_P = 0.25``
and a digit otherwise (always a digit at ``max_depth``); an operator takes 2 to ``max_args`` arguments; a tree is
kept when its token count lies strictly between ``min_length`` and ``max_length``, as in LRA. A source is its
tokens joined by single spaces, e.g. ``"[MAX 2 9 [MIN 4 7 ] 0 ]"`` (value 9); LRA's files add parentheses,
which carry nothing and are left out here. ``MED`` is ``int(np.median(args))``, ``SM`` the sum mod 10.

Randomness is ``np.random.default_rng(seed)``, so a seed gives the same expressions on every machine.
:func:`load` caches a variant's splits as token arrays under the data cache (one ``.npz`` per variant and seed):

* ``full``: LRA's setting, lengths 500-2000, splits 96,000 / 2,000 / 2,000;
* ``cpu``: lengths 50-150, 20,000 / 1,000 / 1,000, sized for a 2-core machine;
* ``quick``: lengths 20-100, 6,000 / 500 / 500, for smoke runs and tests.
"""

from __future__ import annotations

import pathlib

import numpy as np

from distattn_jax.data import classification

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VALUE_P = 0.25
# Token ids: 0 pads, the digits are 1-10, then the operators and the closing bracket.
VOCAB = ("<pad>",) + tuple(str(d) for d in range(10)) + OPERATORS + (END,)
TOKEN_IDS = {t: i for i, t in enumerate(VOCAB)}

VARIANTS = {
    "full": dict(min_length=500, max_length=2000, splits=(96_000, 2_000, 2_000), buckets=(512, 1024, 1536, 2048)),
    # Attention cost grows with the square of the batch's longest example; at 500 tokens a 2-core CPU managed
    # ~0.2 steps/s for this suite's model (batch 32), at 150 tokens ~4.
    "cpu": dict(min_length=50, max_length=150, splits=(20_000, 1_000, 1_000), buckets=(64, 100, 150)),
    "quick": dict(min_length=20, max_length=100, splits=(6_000, 500, 500), buckets=(32, 64, 100)),
}


def apply_operator(op: str, args: list[int]) -> int:
  if op == "[MIN":
    return min(args)
  if op == "[MAX":
    return max(args)
  if op == "[MED":
    return int(np.median(args))
  if op == "[SM":
    return sum(args) % 10
  raise ValueError(f"unknown ListOps operator {op!r}; valid: {', '.join(OPERATORS)}")


class _Uniforms:
  """Uniform draws from ``rng`` served from blocks of 4096: one numpy call per block instead of one per draw
  (per-draw calls made the generator ~20x slower)."""

  def __init__(self, rng: np.random.Generator):
    self.rng, self.block, self.i = rng, np.empty(0), 0

  def __call__(self) -> float:
    if self.i == len(self.block):
      self.block, self.i = self.rng.random(4096), 0
    self.i += 1
    return float(self.block[self.i - 1])

  def integer(self, low: int, high: int) -> int:
    """Uniform in ``[low, high)``."""
    return low + min(int(self() * (high - low)), high - low - 1)


class _TooLong(Exception):
  pass


def _tree(draw: _Uniforms, depth: int, max_depth: int, max_args: int, budget: list[int]) -> tuple[list[str], int]:
  """Tokens and value of one random (sub)expression whose root sits at ``depth`` (the root of a source is 1).
  ``budget[0]`` counts the tokens still allowed; a tree that would exceed it is abandoned (it would be rejected
  by the length bound anyway), so huge trees cost no more than ``max_length`` tokens."""
  budget[0] -= 1
  if budget[0] < 0:
    raise _TooLong
  if depth >= max_depth or draw() >= VALUE_P:
    digit = draw.integer(0, 10)
    return [str(digit)], digit
  num_args = draw.integer(2, max_args + 1)
  op = OPERATORS[draw.integer(0, len(OPERATORS))]
  tokens, values = [op], []
  for _ in range(num_args):
    sub, value = _tree(draw, depth + 1, max_depth, max_args, budget)
    tokens += sub
    values.append(value)
  budget[0] -= 1
  if budget[0] < 0:
    raise _TooLong
  tokens.append(END)
  return tokens, apply_operator(op, values)


def _check(name: str, value, low: int) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
    raise ValueError(f"listops.generate: {name}={value!r} must be an int >= {low}")


def generate(num_examples: int, *, seed: int, min_length: int = 500, max_length: int = 2000, max_depth: int = 10,
             max_args: int = 10) -> tuple[list[str], np.ndarray]:
  """``num_examples`` expressions with ``min_length < tokens < max_length`` and their values (``int32``).

  Trees are drawn one after another from ``default_rng(seed)`` and those outside the length bounds are
  discarded, so the first ``k`` examples of a larger request equal a request for ``k``.
  """
  _check("num_examples", num_examples, 0)
  _check("min_length", min_length, 0)
  _check("max_depth", max_depth, 1)
  _check("max_args", max_args, 2)
  if not isinstance(max_length, (int, np.integer)) or max_length <= min_length + 1:
    raise ValueError(f"listops.generate: max_length={max_length!r} must be an int > min_length + 1 = "
                     f"{min_length + 1}")
  draw = _Uniforms(np.random.default_rng(seed))
  sources, labels = [], []
  while len(sources) < num_examples:
    try:
      tokens, value = _tree(draw, 1, max_depth, max_args, [max_length - 1])
    except _TooLong:
      continue
    if min_length < len(tokens):
      sources.append(" ".join(tokens))
      labels.append(value)
  return sources, np.asarray(labels, np.int32)


def tokenize(source: str) -> np.ndarray:
  """Token ids of a source (parentheses, as in LRA's files, are dropped)."""
  try:
    return np.asarray([TOKEN_IDS[t] for t in source.split() if t not in ("(", ")")], np.int32)
  except KeyError as e:
    raise ValueError(f"listops.tokenize: token {e.args[0]!r} is not ListOps; valid: {' '.join(VOCAB[1:])}")


def load(variant: str = "cpu", *, seed: int = 0, cache_dir: str | pathlib.Path | None = None
         ) -> classification.ClassificationData:
  """The variant's train and test splits (validation is generated and cached but not returned: the ablation
  reports test accuracy at a fixed budget and tunes nothing). Generated once per (variant, seed) and cached."""
  if variant not in VARIANTS:
    raise ValueError(f"listops variant {variant!r} is unknown; valid: {', '.join(VARIANTS)}")
  spec = VARIANTS[variant]
  cache = pathlib.Path(cache_dir) if cache_dir else classification.default_cache_dir()
  path = cache / "listops" / f"{variant}_seed{seed}_len{spec['min_length']}-{spec['max_length']}.npz"

  def build():
    total = sum(spec["splits"])
    sources, labels = generate(total, seed=seed, min_length=spec["min_length"], max_length=spec["max_length"])
    tokens, lengths = classification.pad_sequences([tokenize(s) for s in sources], spec["buckets"][-1], np.int32)
    return {"tokens": tokens, "lengths": lengths, "labels": labels}

  arrays = classification.cached_arrays(path, build)
  n_train, n_val, _ = spec["splits"]

  def split(lo, hi):
    return classification.Split(arrays["tokens"][lo:hi], arrays["lengths"][lo:hi], arrays["labels"][lo:hi])

  return classification.ClassificationData(
      name=f"listops_{variant}", train=split(0, n_train), test=split(n_train + n_val, None),
      num_classes=10, buckets=spec["buckets"], vocab_size=len(VOCAB),
      info={"source": "generated (LRA ListOps spec)", "variant": variant, "seed": seed, "cache": str(path),
            "train": n_train, "test": len(arrays["labels"]) - n_train - n_val})
