"""Reading PyTorch's ``data.pkl`` without executing code and without importing torch.

``SafeUnpickler`` resolves only an allowlist of globals — the ones ``torch.save`` writes for
tensors, storages, dtypes and plain containers — to inert stand-ins that build *descriptors*
(``StorageRef``, ``TensorRef``) instead of tensors. Any other global (``os.system``, a custom
class, …) raises ``FormatError``, like ``torch.load(weights_only=True)`` refuses it.

Work and memory stay proportional to the pickle's size whatever it holds:

* it runs on the pure-Python unpickler, whose opcodes that hash (dict keys, set items) only
  accept strings, bytes, ``None``, booleans, integers below 2**61 and small tuples of strings:
  hashing a tuple is not cached, so a key built from a shared tuple nested 40 times would take
  2**40 steps (or overflow the C stack when nested deeply), and integers and tuples of
  integers can be chosen to collide. ``BUILD`` only sets attributes of an ``OrderedDict`` (a
  ``state_dict``'s ``_metadata``); it would otherwise rewrite the descriptors;
* ``walk_tensors`` expands every container once: a list or dict the pickle references from
  several places (its memo) is named at its first path only, so ``x = [t, t]`` nested 40 times
  gives 2 names, not 2**40. Tensors referenced several times (tied weights) get every name.
"""

from __future__ import annotations

import collections
import io
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from potluck.errors import FormatError
from potluck.formats.base import brief

_FMT = "pytorch"
#: Deepest container nesting ``walk_tensors`` follows.
MAX_DEPTH = 256
#: Longest tensor name (characters) a nested key path may build.
MAX_NAME = 1 << 16
#: Largest dict key or set item that is a tuple (strings, bytes, None, booleans inside).
_MAX_KEY_NODES = 64

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
    if not isinstance(value, (tuple, list)) or (
        value and ({type(x) for x in value} != {int} or min(value) < 0)  # bools are not ints
    ):
        raise FormatError(
            f"{_FMT}: tensor {what} {brief(value)} is not a tuple of non-negative ints"
        )
    return tuple(value)


def _make_tensor(
    storage: object, offset: object, size: object, stride: object, dtype: str
) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise FormatError(
            f"{_FMT}: a tensor is rebuilt from {type(storage).__name__}, not a storage"
        )
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise FormatError(f"{_FMT}: tensor storage offset {brief(offset)} is invalid")
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
        raise FormatError(f"{_FMT}: _rebuild_tensor_v3 got dtype {brief(dtype)}")
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
        raise FormatError(
            f"{_FMT}: unexpected _codecs.encode({type(text).__name__}, {brief(encoding)})"
        )
    return text.encode("latin1")


_INT_KEY_LIMIT = 1 << 61  # below it an integer hashes to itself: no chosen collisions
_KEY_ATOMS = (str, bytes, bool, type(None))


def _refuse_key(key: object) -> FormatError:
    return FormatError(
        f"{_FMT}: data.pkl uses {brief(key)} as a dict key or set item; potluck reads keys "
        "that are strings, bytes, integers below 2**61 or small tuples of strings",
        hint="re-save the checkpoint with string (or small integer) keys",
    )


def _key(key: object) -> object:
    """``key`` when it is cheap and collision-safe to hash; ``FormatError`` otherwise."""
    kind = type(key)
    if kind in _KEY_ATOMS or (isinstance(key, int) and -_INT_KEY_LIMIT < key < _INT_KEY_LIMIT):
        return key
    if kind is not tuple:
        raise _refuse_key(key)
    todo: list[object] = [key]
    seen = 0
    while todo:
        item = todo.pop()
        if type(item) is tuple:
            seen += len(item)
            if seen > _MAX_KEY_NODES:
                raise _refuse_key(key)
            todo.extend(item)
        elif type(item) not in _KEY_ATOMS:
            raise _refuse_key(key)
    return key


def _set(items: Iterable[object] = ()) -> set[object]:
    return set(map(_key, items))


def _frozenset(items: Iterable[object] = ()) -> frozenset[object]:
    return frozenset(map(_key, items))


def _ordered_dict(items: object = ()) -> collections.OrderedDict[object, object]:
    out: collections.OrderedDict[object, object] = collections.OrderedDict()
    pairs = items.items() if isinstance(items, dict) else items
    for k, v in pairs:  # type: ignore[attr-defined]
        out[_key(k)] = v
    return out


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
    ("torch.storage", "UntypedStorage"): StorageType(None),
    ("torch", "UntypedStorage"): StorageType(None),
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): _set,
    ("builtins", "frozenset"): _frozenset,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): _codecs_encode,
    **{("torch", k): StorageType(v) for k, v in STORAGE_DTYPES.items()},
    **{("torch", k): TorchDtype(v) for k, v in TORCH_DTYPES.items()},
}


class SafeUnpickler(pickle._Unpickler):
    """Unpickles ``data.pkl`` into plain containers and ``TensorRef`` descriptors.

    The pure-Python unpickler, with the opcodes that hash or set attributes checked (see the
    module docstring); everything else is the standard library's.
    """

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        """Resolve an allowlisted global to its stand-in; refuse everything else."""
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise FormatError(
                f"pickle needs code execution: {str(module)[:100]}.{str(name)[:100]}; "
                "potluck loads only weights (like torch.load(weights_only=True))",
                hint="re-save the checkpoint with plain tensors, dicts, lists and numbers only",
            ) from None

    def persistent_load(self, pid: Any) -> StorageRef:
        """``('storage', storage_type, key, location, numel)`` -> a ``StorageRef``."""
        if not (
            type(pid) is tuple
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], StorageType)
            and type(pid[2]) is str
            and type(pid[3]) is str
            and type(pid[4]) is int
            and pid[4] >= 0
        ):
            raise FormatError(f"{_FMT}: unsupported persistent id {brief(pid)}")
        ref = StorageRef(pid[2], pid[1].dtype, pid[4], pid[3])
        known = self.storages.setdefault(ref.key, ref)
        if (known.dtype, known.numel) != (ref.dtype, ref.numel):
            raise FormatError(
                f"{_FMT}: storage {brief(ref.key)} is described in two different ways"
            )
        return known

    def _stack(self) -> list[Any]:
        stack: list[Any] = self.stack  # type: ignore[attr-defined]
        return stack

    def _marked(self) -> list[Any]:
        items: list[Any] = self.pop_mark()  # type: ignore[attr-defined]
        return items

    def _setitem(self) -> None:
        stack = self._stack()
        value = stack.pop()
        key = stack.pop()
        stack[-1][_key(key)] = value

    def _setitems(self) -> None:
        items = self._marked()
        target = self._stack()[-1]
        for i in range(0, len(items), 2):
            target[_key(items[i])] = items[i + 1]

    def _dict(self) -> None:
        items = self._marked()
        self._stack().append({_key(items[i]): items[i + 1] for i in range(0, len(items), 2)})

    def _additems(self) -> None:
        items = self._marked()
        target = self._stack()[-1]
        if type(target) is not set:
            raise FormatError(f"{_FMT}: data.pkl adds set items to a {type(target).__name__}")
        target.update(map(_key, items))

    def _frozenset(self) -> None:
        self._stack().append(frozenset(map(_key, self._marked())))

    def _build(self) -> None:
        stack = self._stack()
        state = stack.pop()
        inst = stack[-1]
        if not (
            type(inst) is collections.OrderedDict
            and type(state) is dict
            and all(type(k) is str for k in state)
        ):
            raise FormatError(
                f"{_FMT}: data.pkl sets the state of a {type(inst).__name__}; potluck only "
                "restores an OrderedDict's attributes (like torch.load(weights_only=True))",
                hint="re-save the checkpoint with plain tensors, dicts, lists and numbers only",
            )
        inst.__dict__.update(state)


_OVERRIDES: dict[bytes, Callable[[SafeUnpickler], None]] = {
    pickle.SETITEM: SafeUnpickler._setitem,
    pickle.SETITEMS: SafeUnpickler._setitems,
    pickle.DICT: SafeUnpickler._dict,
    pickle.ADDITEMS: SafeUnpickler._additems,
    pickle.FROZENSET: SafeUnpickler._frozenset,
    pickle.BUILD: SafeUnpickler._build,
}
SafeUnpickler.dispatch.update({op[0]: cast(Any, fn) for op, fn in _OVERRIDES.items()})


def _describe(exc: BaseException) -> str:
    """``exc`` for a message, without printing values read from the file."""
    if all(isinstance(a, (str, int)) and not isinstance(a, bool) for a in exc.args):
        return f"{type(exc).__name__}: {brief(str(exc), 200)}"
    return type(exc).__name__


def load_weights_pickle(data: bytes) -> tuple[object, dict[str, StorageRef]]:
    """Unpickle ``data.pkl`` safely; return the object tree and the storages it references."""
    unpickler = SafeUnpickler(data)
    try:
        obj = unpickler.load()
    except FormatError:
        raise
    except Exception as exc:  # any failure of a hostile or corrupt pickle is a format error
        raise FormatError(
            f"{_FMT}: data.pkl is not a valid weights pickle ({_describe(exc)})",
            hint="the checkpoint is corrupt or was not written by torch.save",
        ) from None
    return obj, unpickler.storages


def walk_tensors(obj: object, name_budget: int = 1 << 24) -> list[tuple[str, TensorRef]]:
    """``(name, tensor)`` for every tensor in nested dicts/lists/tuples, keys joined by ``.``.

    List and tuple items are named by index; a bare top-level tensor is named ``tensor``. Each
    container is expanded once (at its first path, depth first); a tensor gets a name for every
    place it appears. The names may add up to ``name_budget`` characters (callers pass a
    multiple of the pickle's size).
    """
    out: list[tuple[str, TensorRef]] = []
    expanded: set[int] = set()
    todo: list[tuple[object, str, int]] = [(obj, "", 0)]
    while todo:
        node, path, depth = todo.pop()
        if isinstance(node, TensorRef):
            name = path or "tensor"
            name_budget -= len(name)
            if name_budget < 0:
                raise FormatError(f"{_FMT}: data.pkl names more tensors than it could hold")
            out.append((name, node))
            continue
        children = _children(node)
        if children is None or id(node) in expanded:
            continue
        expanded.add(id(node))
        if depth >= MAX_DEPTH:
            raise FormatError(f"{_FMT}: data.pkl is nested more than {MAX_DEPTH} levels deep")
        todo.extend((v, _join(path, k), depth + 1) for k, v in reversed(children))
    return out


def _children(node: object) -> list[tuple[object, object]] | None:
    """The ``(key, child)`` pairs of a container that may lead to a tensor; None for a leaf."""
    if isinstance(node, dict):
        items: list[tuple[object, object]] = list(node.items())
    elif isinstance(node, (list, tuple)):
        items = list(enumerate(node))
    else:
        return None
    return [(k, v) for k, v in items if isinstance(v, (TensorRef, dict, list, tuple))]


def _join(path: str, key: object) -> str:
    part = key if isinstance(key, str) else _key_text(key)
    if len(path) + len(part) >= MAX_NAME:
        raise _name_too_long()
    return f"{path}.{part}" if path else part


def _key_text(key: object) -> str:
    """``str(key)`` for a key that passed ``_key`` or a list index, refused before it is built
    when it would be longer than ``MAX_NAME``."""
    todo, length = [key], 0
    while todo:  # at most _MAX_KEY_NODES items: keys passed _key
        item = todo.pop()
        if isinstance(item, tuple):
            todo.extend(item)
        length += 4 * len(item) + 4 if isinstance(item, (str, bytes)) else 24
    if length >= MAX_NAME:
        raise _name_too_long()
    return str(key)


def _name_too_long() -> FormatError:
    return FormatError(
        f"{_FMT}: a tensor name in data.pkl is longer than {MAX_NAME} characters",
        hint="the checkpoint is corrupt or was crafted",
    )
