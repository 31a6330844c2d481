"""Replay buffers as pure JAX data, usable inside `jax.jit`.

`ReplayBuffer` is a ring buffer over any pytree of arrays (a "transition"):
`add` writes a batch at the write pointer and wraps around, overwriting the
oldest data once full; `sample` draws uniformly, with replacement, from the
filled part. Every method returns a new buffer (functional style), so a buffer
can live in the carry of a `lax.scan`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class ReplayBuffer:
    data: dict  # pytree; every leaf has leading axis `capacity`
    ptr: jax.Array  # () int32, next slot to write
    size: jax.Array  # () int32, number of filled slots (<= capacity)

    @property
    def capacity(self) -> int:
        return jax.tree.leaves(self.data)[0].shape[0]

    @classmethod
    def create(cls, example, capacity: int) -> ReplayBuffer:
        """An empty buffer for items shaped like `example` (one transition)."""
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        data = jax.tree.map(
            lambda x: jnp.zeros((capacity, *jnp.shape(x)), jnp.asarray(x).dtype), example
        )
        return cls(data=data, ptr=jnp.int32(0), size=jnp.int32(0))

    def add(self, batch) -> ReplayBuffer:
        """Append a batch (leading axis n <= capacity on every leaf), wrapping around."""
        n = jax.tree.leaves(batch)[0].shape[0]
        if n > self.capacity:
            raise ValueError(f"cannot add {n} items to a buffer of capacity {self.capacity}")
        idx = (self.ptr + jnp.arange(n)) % self.capacity  # (n,)
        data = jax.tree.map(lambda buf, x: buf.at[idx].set(x), self.data, batch)
        return self.replace(
            data=data,
            ptr=(self.ptr + n) % self.capacity,
            size=jnp.minimum(self.size + n, self.capacity),
        )

    def sample(self, key: jax.Array, batch_size: int):
        """`batch_size` items drawn uniformly with replacement from the filled part."""
        idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(self.size, 1))
        return jax.tree.map(lambda buf: buf[idx], self.data)

    def add_masked(self, batch, mask) -> ReplayBuffer:
        """Append only the rows of `batch` where `mask` (n,) is True, in order, with a
        fixed shape (jit-friendly): masked-out rows are scattered out of bounds and
        dropped. For model rollouts, where terminated branches stop adding data."""
        n = jax.tree.leaves(batch)[0].shape[0]
        if n > self.capacity:
            raise ValueError(f"cannot add {n} items to a buffer of capacity {self.capacity}")
        mask = jnp.asarray(mask, bool)
        offset = jnp.cumsum(mask) - 1  # (n,) position among the kept rows
        idx = jnp.where(mask, (self.ptr + offset) % self.capacity, self.capacity)
        data = jax.tree.map(lambda buf, x: buf.at[idx].set(x, mode="drop"), self.data, batch)
        count = mask.sum().astype(jnp.int32)
        return self.replace(
            data=data,
            ptr=(self.ptr + count) % self.capacity,
            size=jnp.minimum(self.size + count, self.capacity),
        )

    def sample_recent(self, key: jax.Array, batch_size: int, n):
        """`batch_size` items drawn uniformly with replacement from the `n` (may be
        traced) most recently added ones: a buffer that behaves as if its capacity
        were min(n, capacity), without reallocating when n changes."""
        n = jnp.clip(jnp.minimum(n, self.size), 1, self.capacity)
        back = jax.random.randint(key, (batch_size,), 0, n)  # 0 = newest
        idx = (self.ptr - 1 - back) % self.capacity
        return jax.tree.map(lambda buf: buf[idx], self.data)
