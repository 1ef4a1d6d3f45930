"""Linear operators that compose into the PET system model.

Every operator works on NumPy or CuPy arrays alike (the array namespace of
the input is used) and knows its adjoint, so a chain such as
``Multiply(m) @ projector @ psf`` has ``back`` for free.
"""

from __future__ import annotations

import numpy as np

from petbind.core.device import array_module, to_namespace

__all__ = ["LinearOperator", "Composition", "Multiply", "Identity", "adjointness_error"]


class LinearOperator:
    """Base class: subclasses set ``in_shape``/``out_shape`` and implement
    ``_forward`` and ``_back`` (the exact adjoint)."""

    in_shape: tuple = ()
    out_shape: tuple = ()

    def forward(self, x):
        """Apply the operator to ``x`` (shape :attr:`in_shape`)."""
        if tuple(x.shape) != tuple(self.in_shape):
            raise ValueError(f"{type(self).__name__}.forward expects shape {self.in_shape}; got {tuple(x.shape)}")
        return self._forward(x)

    def back(self, y):
        """Apply the adjoint to ``y`` (shape :attr:`out_shape`)."""
        if tuple(y.shape) != tuple(self.out_shape):
            raise ValueError(f"{type(self).__name__}.back expects shape {self.out_shape}; got {tuple(y.shape)}")
        return self._back(y)

    adjoint = back

    def __call__(self, x):
        return self.forward(x)

    def __matmul__(self, other):
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return Composition(self, other)

    def _forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _back(self, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def adjointness_error(self, rng=None, xp=np, dtype=np.float32):
        """Relative mismatch ``|<Ax, y> - <x, A^T y>| / max(|<Ax, y>|, |<x, A^T y>|)``
        for random non-negative ``x`` and ``y``."""
        return adjointness_error(self, rng=rng, xp=xp, dtype=dtype)


def adjointness_error(op, rng=None, xp=np, dtype=np.float32):
    """See :meth:`LinearOperator.adjointness_error`."""
    rng = np.random.default_rng(rng)
    x = xp.asarray(rng.random(op.in_shape).astype(dtype))
    y = xp.asarray(rng.random(op.out_shape).astype(dtype))
    lhs = float(xp.vdot(op.forward(x).astype(xp.float64).ravel(), y.astype(xp.float64).ravel()))
    rhs = float(xp.vdot(x.astype(xp.float64).ravel(), op.back(y).astype(xp.float64).ravel()))
    return abs(lhs - rhs) / max(abs(lhs), abs(rhs), 1e-300)


class Composition(LinearOperator):
    """``outer @ inner``: forward applies ``inner`` first."""

    def __init__(self, outer, inner):
        if tuple(outer.in_shape) != tuple(inner.out_shape):
            raise ValueError(f"cannot compose: {outer.in_shape} (outer input) != {inner.out_shape} (inner output)")
        self.outer, self.inner = outer, inner
        self.in_shape, self.out_shape = tuple(inner.in_shape), tuple(outer.out_shape)

    def _forward(self, x):
        return self.outer.forward(self.inner.forward(x))

    def _back(self, y):
        return self.inner.back(self.outer.back(y))

    def __repr__(self):
        return f"{self.outer!r} @ {self.inner!r}"


class Multiply(LinearOperator):
    """Element-wise multiplication by fixed factors (normalisation × attenuation)."""

    def __init__(self, factors):
        self.factors = factors
        self.in_shape = self.out_shape = tuple(factors.shape)
        self._on_device = {}

    def factors_in(self, xp):
        """The factors in namespace ``xp``: one copy per namespace, made
        explicitly (CuPy refuses implicit host/device conversion) and kept, so
        no call transfers them again."""
        f = self._on_device.get(xp.__name__)
        if f is None:
            f = self._on_device[xp.__name__] = to_namespace(self.factors, xp)
        return f

    def _forward(self, x):
        return x * self.factors_in(array_module(x))

    _back = _forward

    def __repr__(self):
        return f"Multiply(shape={self.in_shape})"


class Identity(LinearOperator):
    def __init__(self, shape):
        self.in_shape = self.out_shape = tuple(shape)

    def _forward(self, x):
        return x

    _back = _forward
