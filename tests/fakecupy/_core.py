"""The stand-in's array type, module functions, ``cuda`` and ``RawModule``.

See the package docstring for the rules.  Everything computes with NumPy on
a private buffer; the point is to fail where CuPy fails.
"""

from __future__ import annotations

import math
import operator
import threading
import time
import types
import weakref

import numpy as np

DEVICE_MEMORY_BYTES = 141 * 2**30  # an H200's; only reported, never enforced

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")


# --------------------------------------------------------------------------------------------
# counters
# --------------------------------------------------------------------------------------------
class Stats:
    """What the code under test asked of the "device".

    Attributes
    ----------
    h2d, d2h : int
        Host-to-device and device-to-host copies; ``h2d_bytes``/``d2h_bytes`` their sizes.
    syncs : int
        Operations that wait for the device (scalar conversions, ``get``,
        boolean masks, ``nonzero``, ``unique``, ``bincount`` ...).
    launches : int
        ``RawModule`` kernel launches.
    live_bytes, peak_bytes : int
        Bytes of device buffers alive now and at most (since :meth:`reset_peak`).
    """

    FIELDS = ("h2d", "h2d_bytes", "d2h", "d2h_bytes", "syncs", "launches")

    def __init__(self):
        self._lock = threading.Lock()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.reset()

    def reset(self):
        for f in self.FIELDS:
            setattr(self, f, 0)
        self.peak_bytes = self.live_bytes

    def reset_peak(self):
        self.peak_bytes = self.live_bytes

    def snapshot(self):
        d = {f: getattr(self, f) for f in self.FIELDS}
        d.update(live_bytes=self.live_bytes, peak_bytes=self.peak_bytes)
        return d

    def copy_in(self, nbytes):
        self.h2d += 1
        self.h2d_bytes += int(nbytes)

    def copy_out(self, nbytes):
        self.sync()
        self.d2h += 1
        self.d2h_bytes += int(nbytes)

    def sync(self):
        self.syncs += 1

    def _alloc(self, nbytes):
        with self._lock:
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _free(self, nbytes):
        with self._lock:
            self.live_bytes -= nbytes

    def __repr__(self):
        return "Stats(" + ", ".join(f"{k}={v}" for k, v in self.snapshot().items()) + ")"


stats = Stats()

# Device memory is accounted per underlying NumPy buffer (the root of a view
# chain), so views are free and every new result is an allocation, as on a GPU.
_roots: dict = {}


def _root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _release(key):
    entry = _roots.get(key)
    if entry is None:
        return
    entry[2] -= 1
    if entry[2] == 0:
        del _roots[key]
        stats._free(entry[1])


# --------------------------------------------------------------------------------------------
# the array
# --------------------------------------------------------------------------------------------
def _new(a):
    """Wrap a NumPy array that lives "on the device"."""
    if a.dtype == object or a.dtype.kind in "USV":
        raise TypeError(f"Unsupported dtype {a.dtype}")
    obj = object.__new__(ndarray)
    obj._a = a
    root = _root(a)
    key = id(root)
    entry = _roots.get(key)
    if entry is None or entry[0] is not root:
        entry = _roots[key] = [root, root.nbytes, 0]
        stats._alloc(root.nbytes)
    entry[2] += 1
    weakref.finalize(obj, _release, key)
    return obj


def _wrap(r):
    if isinstance(r, np.ndarray):
        return _new(r)
    if isinstance(r, np.generic):
        return _new(np.asarray(r))  # CuPy returns 0-d arrays, not scalars
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    if isinstance(r, list):
        return [_wrap(v) for v in r]
    return r


def _reject_host(x):
    raise TypeError(f"Unsupported type {type(x)}")


def _dev(x):
    """Operand of a device operation: device arrays, scalars, plain Python values."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        _reject_host(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_dev(v) for v in x)
    if isinstance(x, dict):
        return {k: _dev(v) for k, v in x.items()}
    return x


def _index(key):
    """An index: device arrays, and host arrays/lists copied in as CuPy does."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, ndarray):
        if key.dtype == bool:
            stats.sync()  # the result's size depends on the mask's contents
        return key._a
    if isinstance(key, (np.ndarray, list)):
        arr = np.asarray(key)
        stats.copy_in(arr.nbytes)
        if arr.dtype == bool:
            stats.sync()
        return arr
    return key


_SCALARS = (int, float, complex, bool, np.generic)


def _binary(fn, reflected=False):
    def method(self, other):
        if isinstance(other, np.ndarray):
            _reject_host(other)
        if isinstance(other, ndarray):
            o = other._a
        elif isinstance(other, _SCALARS):
            o = other
        else:
            return NotImplemented
        return _wrap(fn(o, self._a) if reflected else fn(self._a, o))

    return method


def _inplace(fn):
    def method(self, other):
        if isinstance(other, np.ndarray):
            _reject_host(other)
        o = other._a if isinstance(other, ndarray) else other
        fn(self._a, o)
        return self

    return method


def _method(name, sync=False):
    def method(self, *args, **kwargs):
        if sync:
            stats.sync()
        return _wrap(getattr(self._a, name)(*_dev(args), **_dev(kwargs)))

    method.__name__ = name
    return method


class _Flags:
    def __init__(self, a):
        self.c_contiguous = bool(a.flags.c_contiguous)
        self.f_contiguous = bool(a.flags.f_contiguous)
        self.owndata = bool(a.flags.owndata)

    def __getitem__(self, key):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous, "OWNDATA": self.owndata}[key]


class _MemoryPointer:
    def __init__(self, a):
        self.ptr = int(a.__array_interface__["data"][0])
        self.device_id = 0


class ndarray:
    """Device array of the stand-in (a private NumPy buffer)."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100.0

    def __new__(cls, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("the CuPy stand-in does not implement ndarray(memptr=, strides=)")
        return empty(shape, dtype, order)

    # -- NumPy interoperation: CuPy's rules
    def __array__(self, *args, **kwargs):
        raise TypeError(_IMPLICIT)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        # CuPy computes NumPy ufuncs of its arrays on the device, unless a NumPy array is mixed in.
        if any(isinstance(x, np.ndarray) for x in inputs):
            return NotImplemented
        if not isinstance(getattr(_MODULE, ufunc.__name__, None), _UFunc):
            return NotImplemented
        out = kwargs.pop("out", None)
        if out is not None:
            kwargs["out"] = tuple(_dev(o) for o in out)
        r = getattr(ufunc, method)(*_dev(inputs), **_dev(kwargs))
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(r)

    def __array_function__(self, func, types_, args, kwargs):
        fn = getattr(_MODULE, func.__name__, None) if func is getattr(np, func.__name__, None) else None
        if fn is None or isinstance(fn, _Missing):
            return NotImplemented
        return fn(*args, **kwargs)

    # -- attributes
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    dtype = property(lambda self: self._a.dtype)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: _Flags(self._a))
    T = property(lambda self: _wrap(self._a.T))
    mT = property(lambda self: _wrap(np.swapaxes(self._a, -1, -2)))
    real = property(lambda self: _wrap(self._a.real))
    imag = property(lambda self: _wrap(self._a.imag))
    data = property(lambda self: _MemoryPointer(self._a))
    device = property(lambda self: _MODULE.cuda.Device(0))

    @property
    def base(self):
        return None if not isinstance(self._a.base, np.ndarray) else _wrap(self._a.base)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        for i in range(len(self._a)):
            yield self[i]

    def __getitem__(self, key):
        return _wrap(self._a[_index(key)])

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray):
            stats.copy_in(value.nbytes)
            v = value
        else:
            v = _dev(value)
        self._a[_index(key)] = v

    # -- scalar conversions synchronise and copy to the host
    def _to_host_scalar(self):
        if self._a.size != 1:
            raise TypeError("only size-1 arrays can be converted to Python scalars")
        stats.copy_out(self._a.itemsize)
        return self._a.reshape(()).item()

    def __float__(self):
        return float(self._to_host_scalar())

    def __int__(self):
        return int(self._to_host_scalar())

    def __complex__(self):
        return complex(self._to_host_scalar())

    def __bool__(self):
        return bool(self._to_host_scalar())

    def __repr__(self):
        stats.copy_out(self._a.nbytes)
        return "array(" + np.array2string(self._a, separator=", ") + ")"

    __str__ = __repr__

    def __hash__(self):
        raise TypeError("unhashable type: 'cupy.ndarray'")

    # -- host copies
    def get(self, stream=None, order="C", out=None, blocking=True):
        stats.copy_out(self._a.nbytes)
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray; got {type(arr)}")
        if arr.shape != self._a.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self._a.shape}, new shape: {arr.shape}")
        if arr.dtype != self._a.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self._a.dtype} array")
        stats.copy_in(arr.nbytes)
        self._a[...] = arr

    def item(self):
        return self._to_host_scalar()

    def tolist(self):
        stats.copy_out(self._a.nbytes)
        return self._a.tolist()

    def tobytes(self, order="C"):
        stats.copy_out(self._a.nbytes)
        return self._a.tobytes(order)

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        return _wrap(self._a.astype(dtype, order=order, copy=copy))

    def copy(self, order="C"):
        return _wrap(self._a.copy(order=order))

    def nonzero(self):
        stats.sync()
        return _wrap(self._a.nonzero())

    def scatter_add(self, slices, value):
        np.add.at(self._a, _index(slices), _dev(value))

    def scatter_max(self, slices, value):
        np.maximum.at(self._a, _index(slices), _dev(value))

    def scatter_min(self, slices, value):
        np.minimum.at(self._a, _index(slices), _dev(value))

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()


for _name in ("all", "any", "argmax", "argmin", "argpartition", "argsort", "choose", "clip", "compress", "conj",
              "conjugate", "cumprod", "cumsum", "diagonal", "dot", "fill", "flatten", "max", "mean", "min", "partition",
              "prod", "ptp", "put", "ravel", "repeat", "reshape", "round", "searchsorted", "sort", "squeeze", "std",
              "sum", "swapaxes", "take", "trace", "transpose", "var", "view"):
    if _name == "ptp":
        setattr(ndarray, _name, lambda self, *a, **k: _wrap(np.ptp(self._a, *_dev(a), **_dev(k))))
    elif _name == "compress":
        setattr(ndarray, _name, _method(_name, sync=True))
    else:
        setattr(ndarray, _name, _method(_name))

for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift",
            "matmul"):
    _fn = getattr(operator, _op if _op not in ("and", "or") else _op + "_")
    setattr(ndarray, f"__{_op}__", _binary(_fn))
    setattr(ndarray, f"__r{_op}__", _binary(_fn, reflected=True))
    if _op != "matmul":
        setattr(ndarray, f"__i{_op}__", _inplace(getattr(operator, f"i{_op}")))
for _op in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(ndarray, f"__{_op}__", _binary(getattr(operator, _op)))
setattr(ndarray, "__divmod__", _binary(divmod))
setattr(ndarray, "__rdivmod__", _binary(divmod, reflected=True))
for _op in ("neg", "pos", "abs", "invert"):
    setattr(ndarray, f"__{_op}__", (lambda f: lambda self: _wrap(f(self._a)))(getattr(operator, _op)))
ndarray.__module__ = "cupy"  # petbind recognises CuPy arrays by their type's module


# --------------------------------------------------------------------------------------------
# module functions
# --------------------------------------------------------------------------------------------
_MODULE = None  # the current stand-in ``cupy`` module (for __array_function__ dispatch)


class _Missing:
    """A CuPy name the stand-in does not implement: using it fails loudly."""

    def __init__(self, qualname):
        self.qualname = qualname

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"the CuPy stand-in does not implement {self.qualname}; add it to tests/fakecupy")

    def __getattr__(self, name):
        raise NotImplementedError(f"the CuPy stand-in does not implement {self.qualname}.{name}")

    def __repr__(self):
        return f"<missing {self.qualname}>"


def _host_to_device(obj, dtype=None, copy=True, order="K"):
    if isinstance(obj, ndarray):
        if dtype is None or np.dtype(dtype) == obj.dtype:
            return obj.copy() if copy else obj
        return _wrap(obj._a.astype(dtype))
    if isinstance(obj, (list, tuple)) and any(isinstance(v, ndarray) for v in obj):
        return _wrap(np.array([_dev(v) for v in obj], dtype=dtype))
    arr = np.array(obj, dtype=dtype, copy=True, order=order if order in ("C", "F") else "K")
    stats.copy_in(arr.nbytes)
    return _new(arr)


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, blocking=False):
    out = _host_to_device(obj, dtype, copy=True, order=order)
    if ndmin > out.ndim:
        out = out.reshape((1,) * (ndmin - out.ndim) + out.shape)
    return out


def asarray(a, dtype=None, order=None, blocking=False):
    return _host_to_device(a, dtype, copy=False, order=order or "K")


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        raise TypeError(f"Argument 'a' has incorrect type (expected cupy._core.core._ndarray_base, got {type(a).__name__})")
    if a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return _wrap(np.ascontiguousarray(a._a, dtype=dtype))


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    return np.asarray(a, order=order)


def empty(shape, dtype=float, order="C"):
    a = np.empty(shape, dtype=dtype, order=order)
    a[...] = np.nan if a.dtype.kind in "fc" else (-1 if a.dtype.kind in "iu" else True)  # CuPy's empty is garbage
    return _new(a)


def empty_like(prototype, dtype=None, order="K", subok=None, shape=None):
    return empty(prototype.shape if shape is None else shape, prototype.dtype if dtype is None else dtype)


def get_array_module(*args):
    for a in args:
        if isinstance(a, ndarray):
            return _MODULE
    return np


_SYNCING = {"nonzero", "flatnonzero", "argwhere", "unique", "bincount", "compress", "extract", "count_nonzero_"}


def _generic(name, fn, qual):
    def wrapper(*args, **kwargs):
        if name in _SYNCING or (name == "where" and len(args) + len(kwargs) == 1):
            stats.sync()
        out = kwargs.get("out")
        if isinstance(out, ndarray):
            kwargs = dict(kwargs, out=out._a)
            fn(*_dev(args), **_dev(kwargs))
            return out
        return _wrap(fn(*_dev(args), **_dev(kwargs)))

    wrapper.__name__ = name
    wrapper.__qualname__ = qual
    return wrapper


class _UFunc:
    """A CuPy ufunc: call, ``reduce``, ``accumulate``, ``outer``, ``at``."""

    def __init__(self, uf):
        self._uf = uf
        self.name = self.__name__ = uf.__name__
        self.nin, self.nout, self.nargs, self.types = uf.nin, uf.nout, uf.nargs, uf.types

    def __call__(self, *args, **kwargs):
        out = kwargs.get("out")
        if out is not None:
            outs = out if isinstance(out, tuple) else (out,)
            self._uf(*_dev(args), **dict(_dev({k: v for k, v in kwargs.items() if k != "out"}), out=tuple(_dev(o) for o in outs)))
            return out
        return _wrap(self._uf(*_dev(args), **_dev(kwargs)))

    def reduce(self, *args, **kwargs):
        return _wrap(self._uf.reduce(*_dev(args), **_dev(kwargs)))

    def accumulate(self, *args, **kwargs):
        return _wrap(self._uf.accumulate(*_dev(args), **_dev(kwargs)))

    def outer(self, *args, **kwargs):
        return _wrap(self._uf.outer(*_dev(args), **_dev(kwargs)))

    def at(self, a, indices, b=None):
        self._uf.at(a._a, _index(indices), *(() if b is None else (_dev(b),)))

    def __repr__(self):
        return f"<ufunc '{self.name}'>"


class _StrictModule(types.ModuleType):
    """A module whose unknown attributes are CuPy's: missing ones fail loudly."""

    def __init__(self, name, allowed):
        super().__init__(name)
        self.__dict__["_allowed"] = set(allowed)

    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        if item in self.__dict__["_allowed"]:
            return _Missing(f"{self.__name__}.{item}")
        raise AttributeError(f"module '{self.__name__}' has no attribute '{item}' (not a CuPy name)")


def _fill_from(mod, source, names, qual_prefix):
    for name in names:
        if name in mod.__dict__:
            continue
        obj = getattr(source, name, None)
        if obj is None:
            continue
        if isinstance(obj, np.ufunc):
            setattr(mod, name, _UFunc(obj))
        elif isinstance(obj, (type, float, int)) or obj is np.newaxis:
            setattr(mod, name, obj)  # dtypes and constants are NumPy's own in CuPy
        elif callable(obj):
            setattr(mod, name, _generic(name, obj, f"{qual_prefix}.{name}"))


# --------------------------------------------------------------------------------------------
# cupy.cuda
# --------------------------------------------------------------------------------------------
class CUDARuntimeError(RuntimeError):
    pass


class CUDADriverError(RuntimeError):
    pass


class Device:
    def __init__(self, device=None):
        device = 0 if device is None else int(device)
        if device != 0:
            raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
        self.id = device

    compute_capability = "90"
    pci_bus_id = "0000:00:00.0"

    @property
    def mem_info(self):
        return DEVICE_MEMORY_BYTES - stats.live_bytes, DEVICE_MEMORY_BYTES

    def synchronize(self):
        stats.sync()

    def use(self):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __int__(self):
        return self.id

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


class Stream:
    null = None

    def __init__(self, null=False, non_blocking=False, priority=0):
        pass

    def synchronize(self):
        stats.sync()

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


Stream.null = Stream(null=True)


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def synchronize(self):
        stats.sync()

    @property
    def done(self):
        return True


def get_elapsed_time(start_event, end_event):
    """Milliseconds between two recorded events."""
    return 1000.0 * (end_event._t - start_event._t)


class MemoryPool:
    """CuPy's pool keeps freed blocks until ``free_all_blocks``: what it holds is
    the high-water mark of live buffers since then (fragmentation aside)."""

    def used_bytes(self):
        return stats.live_bytes

    def total_bytes(self):
        return stats.peak_bytes

    def free_bytes(self):
        return stats.peak_bytes - stats.live_bytes

    def n_free_blocks(self):
        return 0

    def free_all_blocks(self, stream=None):
        stats.reset_peak()

    def set_limit(self, size=None, fraction=None):
        return None

    def get_limit(self):
        return 0


_POOL = MemoryPool()


def _runtime_module():
    rt = _StrictModule("cupy.cuda.runtime", [])
    rt.CUDARuntimeError = CUDARuntimeError
    rt.getDeviceCount = lambda: 1
    rt.getDevice = lambda: 0
    rt.setDevice = lambda d: Device(d) and None
    rt.runtimeGetVersion = lambda: 12090
    rt.driverGetVersion = lambda: 12090
    rt.memGetInfo = lambda: Device(0).mem_info
    rt.deviceSynchronize = lambda: stats.sync()
    rt.is_hip = False
    rt.getDeviceProperties = lambda d: {
        "name": b"CuPy stand-in (NumPy)", "totalGlobalMem": DEVICE_MEMORY_BYTES, "major": 9, "minor": 0,
        "multiProcessorCount": 132, "maxThreadsPerBlock": 1024, "maxGridSize": (2**31 - 1, 65535, 65535),
    }
    return rt


# --------------------------------------------------------------------------------------------
# RawModule: checked launches that run the CPU build
# --------------------------------------------------------------------------------------------
def _extent_rules():
    """Elements each pointer argument must hold, by argument name.

    ``v`` maps argument names to host values (arrays as NumPy), ``n`` is the
    thread count.  A kernel argument without a rule fails the launch: new
    kernels must say here how big their buffers are.
    """
    def tof_bins(v):
        return v["num_tof_bins"] if "num_tof_bins" in v and "tof_bin" not in v else 1

    def planes(v, n):
        per_plane = v["num_subset_views"] * v["num_radial"]
        if per_plane <= 0 or n % per_plane:
            raise ValueError(f"num_lors={n} is not a whole number of planes of {per_plane} bins")
        return n // per_plane

    return {
        "lor_start": lambda v, n: 3 * n,
        "lor_end": lambda v, n: 3 * n,
        "image": lambda v, n: int(np.prod(v["image_shape"].astype(np.int64))),
        "image_origin": lambda v, n: 3,
        "voxel_size": lambda v, n: 3,
        "image_shape": lambda v, n: 3,
        "projection": lambda v, n: n * tof_bins(v),
        "lor_values": lambda v, n: n,
        "crystal_xy": lambda v, n: 2 * v["crystals_per_ring"],
        "plane_z": lambda v, n: 2 * planes(v, n),
        "views": lambda v, n: v["num_subset_views"],
        "detector_xyz": lambda v, n: v["detector_xyz"].size if v["detector_xyz"].size % 3 == 0 and v["detector_xyz"].size else -1,
        "detector_ids": lambda v, n: 2 * n,
        "tof_bin": lambda v, n: n,
    }


EXTENTS = _extent_rules()


class _RawFunction:
    def __init__(self, module, sig):
        self.module, self.sig = module, sig
        self.name = sig.name

    def __call__(self, grid, block, args, shared_mem=0, stream=None, enable_cooperative_groups=False):
        sig, name = self.sig, self.name
        for what, dims, limits in (("grid", grid, (2**31 - 1, 65535, 65535)), ("block", block, (1024, 1024, 64))):
            if not isinstance(dims, tuple) or not 1 <= len(dims) <= 3 or not all(isinstance(d, int) and d >= 1 for d in dims):
                raise ValueError(f"{name}: {what} must be a tuple of 1-3 positive ints; got {dims!r}")
            if any(d > lim for d, lim in zip(dims, limits)):
                raise ValueError(f"{name}: {what} {dims} exceeds CUDA's limits {limits}")
        if math.prod(block) > 1024:
            raise ValueError(f"{name}: {math.prod(block)} threads per block; CUDA allows 1024")
        if math.prod(grid[1:]) != 1 or math.prod(block[1:]) != 1:
            raise ValueError(f"{name}: petbind kernels index threads along x only; got grid {grid}, block {block}")
        if not isinstance(args, tuple):
            raise TypeError(f"{name}: kernel arguments must be a tuple; got {type(args).__name__}")
        if len(args) != len(sig.params):
            raise TypeError(f"{name}: {len(sig.params)} arguments declared, {len(args)} given")
        host, values = [], {}
        for p, a in zip(sig.params, args):
            if p.pointer:
                if not isinstance(a, ndarray):
                    raise TypeError(f"{name}: argument {p.name} must be a device array; got {type(a).__name__}")
                if a.dtype != p.dtype:
                    raise TypeError(f"{name}: argument {p.name} is declared {p.ctype}* but the array is {a.dtype}")
                if not a._a.flags.c_contiguous:
                    raise ValueError(f"{name}: argument {p.name} is not C-contiguous")
                host.append(a._a)
            else:
                if not isinstance(a, np.generic) or a.dtype != p.dtype:
                    raise TypeError(f"{name}: argument {p.name} is declared {p.ctype}; pass numpy.{p.dtype} "
                                    f"(got {type(a).__name__}), or CuPy passes the wrong width")
                host.append(a.item())
            values[p.name] = host[-1]
        count = values[sig.count.name]
        if grid[0] * block[0] < count:
            raise ValueError(f"{name}: grid {grid} x block {block} covers {grid[0] * block[0]} threads < {sig.count.name}={count}")
        for p in sig.params:
            if not p.pointer:
                continue
            rule = EXTENTS.get(p.name)
            if rule is None:
                raise ValueError(f"{name}: the stand-in has no extent rule for argument {p.name}; add one to EXTENTS")
            need = rule(values, count)
            if values[p.name].size != need:
                raise ValueError(f"{name}: argument {p.name} holds {values[p.name].size} elements; the launch needs {need}")
        out = values[sig.output.name]
        for p in sig.params:
            if p.pointer and p.const and np.may_share_memory(values[p.name], out):
                raise ValueError(f"{name}: input {p.name} overlaps the output {sig.output.name}")
        if "detector_ids" in values and values["detector_ids"].size:
            ids = values["detector_ids"]
            if ids.min() < 0 or ids.max() >= values["detector_xyz"].size // 3:
                raise ValueError(f"{name}: detector_ids outside [0, {values['detector_xyz'].size // 3})")
        if "tof_bin" in values and values["tof_bin"].size:
            tb = values["tof_bin"]
            if tb.min() < 0 or tb.max() >= values["num_tof_bins"]:
                raise ValueError(f"{name}: tof_bin outside [0, {values['num_tof_bins']})")
        stats.launches += 1
        from petbind.recon import kernels

        kernels.launch_cpu(name, host, count)


class RawModule:
    """``cupy.RawModule(code=...)``: parses the declarations, launches checked."""

    def __init__(self, code=None, path=None, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, name_expressions=None, log_stream=None, jitify=False):
        from petbind.recon import kernels

        if code is None:
            raise NotImplementedError("the CuPy stand-in supports RawModule(code=...) only")
        if not isinstance(options, tuple) or not all(isinstance(o, str) for o in options):
            raise TypeError(f"options must be a tuple of str; got {options!r}")
        if backend != "nvrtc":
            raise ValueError(f"petbind compiles with NVRTC; got backend={backend!r}")
        if code != kernels.kernel_source("joseph"):
            raise ValueError("the stand-in runs the CPU build of petbind's joseph.cu only; this code differs")
        self.code, self.options = code, options
        self._sigs = kernels.parse_kernel_signatures(code, "RawModule code")

    def get_function(self, name):
        sig = self._sigs.get(name)
        if sig is None:
            raise CUDADriverError("CUDA_ERROR_NOT_FOUND: named symbol not found")
        return _RawFunction(self, sig)


# --------------------------------------------------------------------------------------------
# assembling the modules
# --------------------------------------------------------------------------------------------
def build_modules(api):
    global _MODULE
    try:
        import scipy.ndimage as scipy_ndimage
    except ImportError:  # cupyx.scipy.ndimage then has only missing names
        scipy_ndimage = None

    cupy = _StrictModule("cupy", api["cupy"])
    cupy.__standin__ = True
    cupy.__version__ = api["cupy_version"] + "+numpy-standin"
    cupy.__path__ = []
    cupy.ndarray = ndarray
    for fn in (array, asarray, ascontiguousarray, asnumpy, empty, empty_like, get_array_module):
        setattr(cupy, fn.__name__, fn)
    cupy.asanyarray = asarray
    cupy.RawModule = RawModule
    cupy.get_default_memory_pool = lambda: _POOL
    cupy.get_default_pinned_memory_pool = lambda: _POOL
    cupy.cuda = cuda = _StrictModule("cupy.cuda", api["cupy.cuda"])
    cuda.__path__ = []
    cuda.runtime = _runtime_module()
    cuda.Device = Device
    cuda.Stream = Stream
    cuda.Event = Event
    cuda.get_elapsed_time = get_elapsed_time
    cuda.MemoryPool = MemoryPool
    cuda.is_available = lambda: True
    cuda.driver = _StrictModule("cupy.cuda.driver", [])
    cuda.driver.CUDADriverError = CUDADriverError
    _fill_from(cupy, np, api["cupy"], "cupy")
    cupy.newaxis = None
    cupy.linalg = _StrictModule("cupy.linalg", api["cupy.linalg"])
    _fill_from(cupy.linalg, np.linalg, api["cupy.linalg"], "cupy.linalg")
    cupy.fft = _StrictModule("cupy.fft", api["cupy.fft"])
    _fill_from(cupy.fft, np.fft, api["cupy.fft"], "cupy.fft")
    cupy.random = _StrictModule("cupy.random", api["cupy.random"])  # host RNG only: every name is missing
    cupyx = _StrictModule("cupyx", api["cupyx"])
    cupyx.__path__ = []
    cupyx.scipy = _StrictModule("cupyx.scipy", ["ndimage"])
    cupyx.scipy.__path__ = []
    nd = _StrictModule("cupyx.scipy.ndimage", api["cupyx.scipy.ndimage"])
    if scipy_ndimage is not None:
        _fill_from(nd, scipy_ndimage, api["cupyx.scipy.ndimage"], "cupyx.scipy.ndimage")
    cupyx.scipy.ndimage = nd
    _MODULE = cupy
    return {
        "cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.runtime": cuda.runtime, "cupy.cuda.driver": cuda.driver,
        "cupy.linalg": cupy.linalg, "cupy.fft": cupy.fft, "cupy.random": cupy.random,
        "cupyx": cupyx, "cupyx.scipy": cupyx.scipy, "cupyx.scipy.ndimage": nd,
    }
