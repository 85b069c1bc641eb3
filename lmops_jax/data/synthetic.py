"""A Markov source with a known entropy, so that a model's excess loss can be measured.

A model trained on text has an unknown loss floor; one trained on samples of a `MarkovSource` does not:
`optimal_loss(L)` is the expected per-token cross-entropy of the true model on a sequence of L symbols,
so `model_loss - optimal_loss(L)` is the model's excess loss in nats per symbol (0 for a perfect model).

The source is an order-k Markov chain over a small alphabet. Its state is the tuple of the last k
symbols, encoded as the integer sum_i s_i * A^(k-1-i) over the symbols s_0..s_{k-1}, oldest first
(A = alphabet size). Each state's next-symbol distribution is drawn from a Dirichlet with a small
concentration (sparse-ish rows, so the entropy rate is well below log A), mixed with a little of the
uniform distribution so the chain is irreducible and aperiodic and every sequence has finite loss.
Sequences start from the stationary distribution, so the process is stationary.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats along `axis`, with 0 log 0 = 0."""
    logp = np.log(np.where(p > 0, p, 1.0))
    return -np.sum(p * logp, axis=axis)


@dataclasses.dataclass(frozen=True)
class MarkovSource:
    """An order-`order` Markov chain over the characters of `alphabet`.

    Attributes:
      alphabet: distinct ASCII characters, one per symbol (symbol i is alphabet[i]).
      order: number of previous symbols the next one depends on (k >= 1).
      concentration: Dirichlet concentration of each transition row; smaller is sparser.
      smoothing: weight of the uniform distribution mixed into each row, in [0, 1).
      seed: seed of the transition table; the same fields always give the same chain.
    """

    alphabet: str = "abcdefghijklmnop"
    order: int = 2
    concentration: float = 0.1
    smoothing: float = 0.01
    seed: int = 0

    def __post_init__(self):
        if len(self.alphabet) < 2 or len(set(self.alphabet)) != len(self.alphabet):
            raise ValueError(f"alphabet must hold at least 2 distinct characters, got {self.alphabet!r}")
        if not self.alphabet.isascii():
            raise ValueError(f"alphabet must be ASCII (one byte per symbol), got {self.alphabet!r}")
        if self.order < 1:
            raise ValueError(f"order must be >= 1, got {self.order}")
        if self.num_states > 1 << 20:
            raise ValueError(f"alphabet size {self.alphabet_size} ** order {self.order} = {self.num_states} "
                             "states is too many (limit 2**20)")
        if not self.concentration > 0:
            raise ValueError(f"concentration must be > 0, got {self.concentration}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must lie in [0, 1), got {self.smoothing}")

    @property
    def alphabet_size(self) -> int:
        return len(self.alphabet)

    @property
    def num_states(self) -> int:
        return self.alphabet_size ** self.order

    @functools.cached_property
    def transition(self) -> np.ndarray:
        """Next-symbol probabilities [num_states, alphabet_size], float64; rows sum to 1."""
        rng = np.random.default_rng(self.seed)
        a = self.alphabet_size
        rows = rng.dirichlet(np.full(a, self.concentration), size=self.num_states)
        rows = (1.0 - self.smoothing) * rows + self.smoothing / a
        return rows / rows.sum(axis=1, keepdims=True)

    @functools.cached_property
    def stationary(self) -> np.ndarray:
        """Stationary distribution [num_states] over k-tuples of symbols, float64.

        Power iteration on the k-tuple chain, which moves (s_0..s_{k-1}) to (s_1..s_{k-1}, x) with
        probability transition[state, x]. Each step costs O(A^(k+1)) and the chain mixes quickly
        (smoothing > 0 makes every row positive), so it runs to machine precision.
        """
        a, n = self.alphabet_size, self.num_states
        pi = np.full(n, 1.0 / n)
        for _ in range(100_000):
            joint = pi[:, None] * self.transition  # [n, A]: P(state, next symbol)
            new = joint.reshape(a, n // a, a).sum(axis=0).reshape(n)  # drop the oldest symbol
            new /= new.sum()
            if np.abs(new - pi).sum() < 1e-15:
                return new
            pi = new
        raise RuntimeError(f"stationary distribution of {self} did not converge (is the chain periodic? "
                           "use smoothing > 0)")

    def entropy_rate(self) -> float:
        """Entropy rate of the stationary chain in nats/symbol: sum_s pi(s) H(transition[s])."""
        return float(np.dot(self.stationary, _entropy(self.transition)))

    def prefix_entropy(self, j: int) -> float:
        """Joint entropy H(X_1..X_j) in nats of the first j <= order symbols of a stationary sequence."""
        if not 0 <= j <= self.order:
            raise ValueError(f"prefix length must lie in [0, order={self.order}], got {j}")
        marginal = self.stationary.reshape(self.alphabet_size ** j, -1).sum(axis=1)
        return float(_entropy(marginal))

    def optimal_loss(self, length: int) -> float:
        """Expected per-token cross-entropy (nats) of the true model on `length` symbols.

        The true model predicts X_1 with no context, then X_t given X_<t. The sum of the first k terms
        H(X_1) + H(X_2|X_1) + ... + H(X_k|X_<k) is the joint entropy H(X_1..X_k) of the stationary
        k-tuple; every later term is the entropy rate. The mean over the `length` tokens is returned.
        """
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if length <= self.order:
            return self.prefix_entropy(length) / length
        return (self.prefix_entropy(self.order) + (length - self.order) * self.entropy_rate()) / length

    def sample(self, rng: np.random.Generator, num_sequences: int, length: int) -> np.ndarray:
        """Samples stationary sequences as symbol indices, uint8 [num_sequences, length].

        Vectorised over sequences: one inverse-CDF lookup per position. Use `to_strings` for text.
        """
        if num_sequences < 0 or length < 0:
            raise ValueError(f"num_sequences and length must be >= 0, got {num_sequences}, {length}")
        a, k = self.alphabet_size, self.order
        out = np.empty((num_sequences, length), np.uint8)
        state = rng.choice(self.num_states, size=num_sequences, p=self.stationary)
        for i in range(min(k, length)):  # the first k symbols are the digits of the stationary state
            out[:, i] = (state // a ** (k - 1 - i)) % a
        cdf = np.cumsum(self.transition, axis=1)
        for t in range(k, length):
            u = rng.random(num_sequences)
            symbol = np.minimum((u[:, None] > cdf[state]).sum(axis=1), a - 1)
            out[:, t] = symbol
            state = (state * a + symbol) % self.num_states
        return out

    def token_log_probs(self, symbols: np.ndarray) -> np.ndarray:
        """True log-probabilities log p(x_t | x_<t) [N, L] (float64) of symbol indices [N, L]."""
        symbols = np.asarray(symbols, np.int64)
        if symbols.ndim != 2 or (symbols.size and (symbols.min() < 0 or symbols.max() >= self.alphabet_size)):
            raise ValueError(f"symbols must be a [N, L] array of indices in [0, {self.alphabet_size}), "
                             f"got shape {symbols.shape}")
        a, k = self.alphabet_size, self.order
        n, length = symbols.shape
        out = np.empty((n, length))
        prefix = np.zeros(n, np.int64)
        prev_log_marginal = np.zeros(n)
        for j in range(min(k, length)):  # log p(x_j | x_<j) = log P(x_<=j) - log P(x_<j)
            prefix = prefix * a + symbols[:, j]
            marginal = self.stationary.reshape(a ** (j + 1), -1).sum(axis=1)
            log_marginal = np.log(marginal[prefix])
            out[:, j] = log_marginal - prev_log_marginal
            prev_log_marginal = log_marginal
        state = prefix
        log_transition = np.log(self.transition)
        for t in range(k, length):
            out[:, t] = log_transition[state, symbols[:, t]]
            state = (state * a + symbols[:, t]) % self.num_states
        return out

    def to_strings(self, symbols: np.ndarray) -> list[bytes]:
        """Maps symbol indices [N, L] to N byte strings of length L (one ASCII byte per symbol)."""
        table = np.frombuffer(self.alphabet.encode("ascii"), np.uint8)
        chars = table[np.asarray(symbols)]
        return [row.tobytes() for row in chars]
