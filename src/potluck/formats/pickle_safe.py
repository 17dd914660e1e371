"""Reading PyTorch's ``data.pkl`` without executing code and without importing torch.

``SafeUnpickler`` resolves only an allowlist of globals — the ones ``torch.save`` writes for
tensors, storages, dtypes and plain containers — to inert stand-ins that build *descriptors*
(``StorageRef``, ``TensorRef``) instead of tensors. Any other global (``os.system``, a custom
class, …) raises ``FormatError``, like ``torch.load(weights_only=True)`` refuses it.
"""

from __future__ import annotations

import collections
import io
import pickle
from dataclasses import dataclass
from typing import Any

from potluck.errors import FormatError

_FMT = "pytorch"

#: Typed storage classes pickled as ``torch.<Name>`` -> canonical dtype.
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
    "ComplexFloatStorage": "C64",
    "ComplexDoubleStorage": "C128",
}

#: ``torch.<name>`` dtype objects (pickled by ``_rebuild_tensor_v3``) -> canonical dtype.
TORCH_DTYPES: dict[str, str] = {
    "float64": "F64",
    "double": "F64",
    "float32": "F32",
    "float": "F32",
    "float16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "long": "I64",
    "int32": "I32",
    "int": "I32",
    "int16": "I16",
    "short": "I16",
    "int8": "I8",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
    "complex64": "C64",
    "cfloat": "C64",
    "complex128": "C128",
    "cdouble": "C128",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
}


@dataclass(frozen=True)
class StorageType:
    """Stand-in for a storage class; ``dtype`` is None for ``UntypedStorage`` (bytes)."""

    dtype: str | None


@dataclass(frozen=True)
class TorchDtype:
    """Stand-in for a ``torch.<dtype>`` object."""

    name: str


@dataclass(frozen=True)
class StorageRef:
    """A storage saved as zip member ``data/<key>``: ``numel`` elements of ``dtype``.

    For an untyped storage ``dtype`` is None and ``numel`` counts bytes.
    """

    key: str
    dtype: str | None
    numel: int
    location: str


@dataclass(frozen=True)
class TensorRef:
    """A tensor: ``shape``/``stride``/``offset`` (elements of ``dtype``) into ``storage``."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str


def _ints(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value
    ):
        raise FormatError(f"{_FMT}: tensor {what} {value!r} is not a tuple of non-negative ints")
    return tuple(value)


def _make_tensor(
    storage: object, offset: object, size: object, stride: object, dtype: str
) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise FormatError(
            f"{_FMT}: a tensor is rebuilt from {type(storage).__name__}, not a storage"
        )
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise FormatError(f"{_FMT}: tensor storage offset {offset!r} is invalid")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise FormatError(f"{_FMT}: tensor size {shape} and stride {strides} differ in length")
    return TensorRef(storage, offset, shape, strides, dtype)


def rebuild_tensor_v2(
    storage: object, offset: object, size: object, stride: object, *_rest: object
) -> TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2`` (dtype from the typed storage)."""
    if not isinstance(storage, StorageRef) or storage.dtype is None:
        raise FormatError(f"{_FMT}: _rebuild_tensor_v2 needs a typed storage")
    return _make_tensor(storage, offset, size, stride, storage.dtype)


def rebuild_tensor_v3(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    backward_hooks: object,
    dtype: object,
    *_rest: object,
) -> TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v3`` (untyped storage + explicit dtype)."""
    if not isinstance(dtype, TorchDtype):
        raise FormatError(f"{_FMT}: _rebuild_tensor_v3 got dtype {dtype!r}")
    return _make_tensor(storage, offset, size, stride, dtype.name)


def rebuild_parameter(data: object, *_rest: object) -> object:
    """Stand-in for ``torch._utils._rebuild_parameter[_with_state]``: the parameter's tensor."""
    return data


def _torch_size(seq: object = ()) -> tuple[int, ...]:
    return _ints(seq, "torch.Size")


def _torch_device(kind: object, index: object = None) -> str:
    return f"{kind}" if index is None else f"{kind}:{index}"


def _codecs_encode(text: object, encoding: object = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise FormatError(f"{_FMT}: unexpected _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
    ("torch.storage", "UntypedStorage"): StorageType(None),
    ("torch", "UntypedStorage"): StorageType(None),
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): _codecs_encode,
    **{("torch", k): StorageType(v) for k, v in STORAGE_DTYPES.items()},
    **{("torch", k): TorchDtype(v) for k, v in TORCH_DTYPES.items()},
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` into plain containers and ``TensorRef`` descriptors."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        """Resolve an allowlisted global to its stand-in; refuse everything else."""
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise FormatError(
                f"pickle needs code execution: {module}.{name}; potluck loads only weights "
                "(like torch.load(weights_only=True))",
                hint="re-save the checkpoint with plain tensors, dicts, lists and numbers only",
            ) from None

    def persistent_load(self, pid: Any) -> StorageRef:
        """``('storage', storage_type, key, location, numel)`` -> a ``StorageRef``."""
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
            and pid[4] >= 0
        ):
            raise FormatError(f"{_FMT}: unsupported persistent id {pid!r:.200}")
        ref = StorageRef(pid[2], pid[1].dtype, pid[4], str(pid[3]))
        known = self.storages.setdefault(ref.key, ref)
        if (known.dtype, known.numel) != (ref.dtype, ref.numel):
            raise FormatError(f"{_FMT}: storage {ref.key!r} is described in two different ways")
        return known


def load_weights_pickle(data: bytes) -> tuple[object, dict[str, StorageRef]]:
    """Unpickle ``data.pkl`` safely; return the object tree and the storages it references."""
    unpickler = SafeUnpickler(data)
    try:
        obj = unpickler.load()
    except FormatError:
        raise
    except Exception as exc:  # any failure of a hostile or corrupt pickle is a format error
        raise FormatError(
            f"{_FMT}: data.pkl is not a valid weights pickle ({type(exc).__name__}: {exc})",
            hint="the checkpoint is corrupt or was not written by torch.save",
        ) from None
    return obj, unpickler.storages


def walk_tensors(obj: object) -> list[tuple[str, TensorRef]]:
    """``(name, tensor)`` for every tensor in nested dicts/lists/tuples, keys joined by ``.``.

    List and tuple items are named by index; a bare top-level tensor is named ``tensor``.
    """
    out: list[tuple[str, TensorRef]] = []
    _walk(obj, "", out, set())
    return out


def _walk(obj: object, path: str, out: list[tuple[str, TensorRef]], active: set[int]) -> None:
    if isinstance(obj, TensorRef):
        out.append((path or "tensor", obj))
        return
    children: list[tuple[object, object]]
    if isinstance(obj, dict):
        children = list(obj.items())
    elif isinstance(obj, (list, tuple)):
        children = list(enumerate(obj))
    else:
        return
    if id(obj) in active:
        return  # a cycle: the container is already being walked
    if len(active) > 256:
        raise FormatError(f"{_FMT}: data.pkl is nested more than 256 levels deep")
    active.add(id(obj))
    for key, value in children:
        _walk(value, f"{path}.{key}" if path else str(key), out, active)
    active.discard(id(obj))
