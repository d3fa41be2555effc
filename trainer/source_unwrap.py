"""Static decoding of self-extracting ``train_gpt.py`` wrappers.

Many late submissions ship their script as a one-liner such as::

    import lzma as L,base64 as B
    exec(L.decompress(B.b85decode("..."),format=L.FORMAT_RAW,filters=[{"id":L.FILTER_LZMA2}]))

The code that is actually run lives in the payload, so the scanner has to read it. This module evaluates the
argument of ``exec`` with a tiny interpreter that knows only literals, module-level constant names, string and
bytes concatenation, the ``base64`` decoders and the ``lzma`` / ``zlib`` / ``gzip`` / ``bz2`` decompressors.
Nothing from the scanned file is imported, compiled or executed, and every decompression is bounded: a payload
that would expand beyond ``MAX_DECODED_BYTES`` is refused as a decompression bomb.
"""

from __future__ import annotations

import ast
import base64
import binascii
import bz2
import lzma
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from trainer.limits import SUBMISSION_LIMIT_BYTES
from trainer.source_syntax import parse_python

# A real script is at most a few hundred kilobytes; decoded code larger than the whole submission cap cannot be one.
MAX_DECODED_BYTES = SUBMISSION_LIMIT_BYTES
# Wrappers are sometimes nested (a wrapper of a wrapper); deeper nesting is treated as hostile.
MAX_LAYERS = 4


class UnwrapError(ValueError):
    """A self-extracting payload was found but cannot be decoded statically."""


@dataclass(frozen=True)
class Layer:
    """One decoded payload: where its ``exec`` sits in the enclosing text and which codecs produced it."""

    line: int
    codecs: tuple[str, ...]

    def describe(self) -> str:
        return f"{'+'.join(self.codecs)} payload exec'd at line {self.line}"


@dataclass
class Unwrapped:
    """The innermost source text plus the chain of layers peeled off to reach it."""

    source: str
    layers: list[Layer] = field(default_factory=list)
    tree: ast.Module | None = None  # the parsed innermost source
    # Environment defaults that wrapper shells set before exec'ing the payload (os.environ.setdefault(...)).
    env_overrides: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class _NotStatic(Exception):
    """The expression depends on something the static interpreter does not model."""


_Decoder = Callable[[list[object], dict[str, object]], object]


def _bounded_lzma(args: list[object], kwargs: dict[str, object]) -> bytes:
    data = _as_bytes(args[0])
    fmt = kwargs.get("format", args[1] if len(args) > 1 else lzma.FORMAT_AUTO)
    filters = kwargs.get("filters", args[3] if len(args) > 3 else None)
    if not isinstance(fmt, int):
        raise _NotStatic
    try:
        decompressor = lzma.LZMADecompressor(format=fmt, filters=filters)  # type: ignore[arg-type]
        out = decompressor.decompress(data, max_length=MAX_DECODED_BYTES + 1)
    except (lzma.LZMAError, TypeError, ValueError) as exc:
        raise UnwrapError(f"lzma payload does not decode: {exc}") from exc
    if len(out) > MAX_DECODED_BYTES:
        raise UnwrapError(f"lzma payload expands beyond {MAX_DECODED_BYTES} bytes (decompression bomb)")
    return out


def _bounded_zlib(data: bytes, wbits: int) -> bytes:
    try:
        decompressor = zlib.decompressobj(wbits)
        out = decompressor.decompress(data, MAX_DECODED_BYTES + 1)
    except zlib.error as exc:
        raise UnwrapError(f"zlib payload does not decode: {exc}") from exc
    if len(out) > MAX_DECODED_BYTES or decompressor.unconsumed_tail:
        raise UnwrapError(f"zlib payload expands beyond {MAX_DECODED_BYTES} bytes (decompression bomb)")
    return out


def _zlib(args: list[object], kwargs: dict[str, object]) -> bytes:
    wbits = kwargs.get("wbits", args[1] if len(args) > 1 else zlib.MAX_WBITS)
    if not isinstance(wbits, int):
        raise _NotStatic
    return _bounded_zlib(_as_bytes(args[0]), wbits)


def _gzip(args: list[object], kwargs: dict[str, object]) -> bytes:
    return _bounded_zlib(_as_bytes(args[0]), 16 + zlib.MAX_WBITS)


def _bz2(args: list[object], kwargs: dict[str, object]) -> bytes:
    try:
        out = bz2.BZ2Decompressor().decompress(_as_bytes(args[0]), max_length=MAX_DECODED_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise UnwrapError(f"bz2 payload does not decode: {exc}") from exc
    if len(out) > MAX_DECODED_BYTES:
        raise UnwrapError(f"bz2 payload expands beyond {MAX_DECODED_BYTES} bytes (decompression bomb)")
    return out


def _brotli(args: list[object], kwargs: dict[str, object]) -> bytes:
    import brotli  # a dependency for upstream .ptz artifacts; imported here so plain scans do not load it

    decompressor = brotli.Decompressor()
    try:
        # output_buffer_limit stops the expansion one byte past the bound instead of after the bomb has landed.
        out = decompressor.process(_as_bytes(args[0]), output_buffer_limit=MAX_DECODED_BYTES + 1)
    except brotli.error as exc:
        raise UnwrapError(f"brotli payload does not decode: {exc}") from exc
    if len(out) > MAX_DECODED_BYTES or not decompressor.is_finished():
        raise UnwrapError(f"brotli payload expands beyond {MAX_DECODED_BYTES} bytes or is truncated")
    return out


def _base(decoder: Callable[[bytes], bytes], name: str) -> _Decoder:
    def decode(args: list[object], kwargs: dict[str, object]) -> bytes:
        try:
            return decoder(_as_bytes(args[0]))
        except (binascii.Error, ValueError) as exc:
            raise UnwrapError(f"{name} payload does not decode: {exc}") from exc

    return decode


# Fully qualified callables the interpreter may evaluate, with the codec name reported for each.
_DECODERS: dict[str, tuple[str, _Decoder]] = {
    "base64.b85decode": ("base85", _base(base64.b85decode, "base85")),
    "base64.a85decode": ("ascii85", _base(base64.a85decode, "ascii85")),
    "base64.b64decode": ("base64", _base(base64.b64decode, "base64")),
    "base64.standard_b64decode": ("base64", _base(base64.standard_b64decode, "base64")),
    "base64.urlsafe_b64decode": ("base64", _base(base64.urlsafe_b64decode, "base64")),
    "base64.decodebytes": ("base64", _base(base64.decodebytes, "base64")),
    "base64.b32decode": ("base32", _base(base64.b32decode, "base32")),
    "base64.b16decode": ("base16", _base(base64.b16decode, "base16")),
    "binascii.a2b_base64": ("base64", _base(binascii.a2b_base64, "base64")),
    "lzma.decompress": ("lzma", _bounded_lzma),
    "zlib.decompress": ("zlib", _zlib),
    "gzip.decompress": ("gzip", _gzip),
    "bz2.decompress": ("bz2", _bz2),
    "brotli.decompress": ("brotli", _brotli),
}
# Module constants a wrapper may pass as arguments (format=L.FORMAT_RAW, filters=[{"id": L.FILTER_LZMA2}]).
_CONSTANT_MODULES = {"lzma": lzma, "zlib": zlib}


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("ascii", errors="strict")
    raise _NotStatic


class _StaticEvaluator:
    """Evaluates the argument of ``exec`` from literals and whitelisted decoders only."""

    def __init__(self, module: ast.Module) -> None:
        self.aliases = _import_aliases(module)
        self.constants = _module_constants(module)
        self.codecs: list[str] = []

    def evaluate(self, node: ast.expr, depth: int = 0) -> object:
        if depth > 64:
            raise _NotStatic
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes, int)):
            return node.value
        if isinstance(node, ast.Name) and node.id in self.constants:
            return self.evaluate(self.constants[node.id], depth + 1)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = self.evaluate(node.left, depth + 1), self.evaluate(node.right, depth + 1)
            if type(left) is type(right) and isinstance(left, (str, bytes)):
                return left + right  # type: ignore[operator]
            raise _NotStatic
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            left, right = self.evaluate(node.left, depth + 1), self.evaluate(node.right, depth + 1)
            if isinstance(left, int) and isinstance(right, int):
                return left | right
            raise _NotStatic
        if isinstance(node, ast.Attribute):
            dotted = self._dotted(node)
            module_name, _, attr = dotted.rpartition(".")
            module = _CONSTANT_MODULES.get(module_name)
            if module is not None and attr.isupper() and isinstance(getattr(module, attr, None), int):
                return getattr(module, attr)
            raise _NotStatic
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self.evaluate(element, depth + 1) for element in node.elts]
        if isinstance(node, ast.Dict):
            if any(key is None for key in node.keys):
                raise _NotStatic
            return {
                self.evaluate(key, depth + 1): self.evaluate(value, depth + 1)  # type: ignore[arg-type]
                for key, value in zip(node.keys, node.values, strict=True)
            }
        if isinstance(node, ast.Call):
            return self._call(node, depth)
        raise _NotStatic

    def _call(self, node: ast.Call, depth: int) -> object:
        if any(isinstance(arg, ast.Starred) for arg in node.args) or any(kw.arg is None for kw in node.keywords):
            raise _NotStatic
        func = node.func
        # Method calls on an evaluated value: "...".encode(), b"...".decode(), bytes.fromhex("...").
        if isinstance(func, ast.Attribute) and func.attr in {"encode", "decode"}:
            receiver = self.evaluate(func.value, depth + 1)
            if func.attr == "decode" and isinstance(receiver, bytes):
                try:
                    return receiver.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise UnwrapError(f"decoded payload is not UTF-8 text: {exc}") from exc
            if func.attr == "encode" and isinstance(receiver, str):
                return receiver.encode("utf-8")
            raise _NotStatic
        if isinstance(func, ast.Attribute) and func.attr == "fromhex" and self._dotted(func.value) == "bytes":
            text = self.evaluate(node.args[0], depth + 1)
            if isinstance(text, str):
                try:
                    return bytes.fromhex(text)
                except ValueError as exc:
                    raise UnwrapError(f"hex payload does not decode: {exc}") from exc
            raise _NotStatic
        if isinstance(func, ast.Name) and func.id == "compile" and node.args:
            # exec(compile(SOURCE, "<string>", "exec")) runs SOURCE.
            return self.evaluate(node.args[0], depth + 1)
        qualified = self._dotted(func)
        if qualified not in _DECODERS:
            raise _NotStatic
        codec, decoder = _DECODERS[qualified]
        args = [self.evaluate(arg, depth + 1) for arg in node.args]
        kwargs = {str(kw.arg): self.evaluate(kw.value, depth + 1) for kw in node.keywords}
        if not args:
            raise _NotStatic
        self.codecs.append(codec)
        return decoder(args, kwargs)

    def _dotted(self, node: ast.expr) -> str:
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return ""
        parts.append(self.aliases.get(node.id, node.id))
        return ".".join(reversed(parts))


def _import_aliases(module: ast.Module) -> dict[str, str]:
    """Local name -> qualified name for every import in the file (``import lzma as L`` gives L -> lzma)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(module):
        if isinstance(node, ast.Import):
            for alias in node.names:
                # "import a.b as x" binds x to a.b; "import a.b" binds only a.
                local = alias.asname or alias.name.split(".")[0]
                aliases[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _module_constants(module: ast.Module) -> dict[str, ast.expr]:
    """Module-level names bound exactly once, so that ``exec(L.decompress(B.b85decode(_C)))`` resolves ``_C``."""
    bound: dict[str, list[ast.expr]] = {}
    for stmt in module.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            bound.setdefault(stmt.targets[0].id, []).append(stmt.value)
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            bound.setdefault(stmt.target.id, []).append(stmt.value)
    return {name: values[0] for name, values in bound.items() if len(values) == 1}


def _exec_calls(module: ast.Module) -> list[ast.Call]:
    """``exec(...)`` calls at module level, including under ``if __name__ == "__main__":`` and ``try:``."""
    calls: list[ast.Call] = []
    pending: list[ast.stmt] = list(module.body)
    while pending:
        stmt = pending.pop(0)
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(stmt, (ast.If, ast.Try, ast.With)):
            pending.extend(getattr(stmt, "body", []))
            pending.extend(getattr(stmt, "orelse", []))
            continue
        for node in ast.walk(stmt):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "exec" and node.args:
                calls.append(node)
    return calls


def _env_overrides(module: ast.Module) -> dict[str, str]:
    """``os.environ.setdefault("K", "v")`` / ``os.environ["K"] = "v"`` in a wrapper shell configure its payload."""
    overrides: dict[str, str] = {}
    for node in ast.walk(module):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "setdefault"
            and ast.unparse(node.func.value).endswith("environ")
            and len(node.args) == 2
            and all(isinstance(arg, ast.Constant) and isinstance(arg.value, str) for arg in node.args)
        ):
            overrides.setdefault(node.args[0].value, node.args[1].value)  # type: ignore[union-attr]
        elif (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Subscript)
            and ast.unparse(node.targets[0].value).endswith("environ")
            and isinstance(node.targets[0].slice, ast.Constant)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            overrides[str(node.targets[0].slice.value)] = node.value.value
    return overrides


def describe_layers(layers: list[Layer]) -> str:
    return " > ".join(layer.describe() for layer in layers)


def _parse_layer(source: str, layers: list[Layer]) -> ast.Module:
    """Parse one layer (Python 3.12 grammar). A syntax error in a decoded payload names that payload and the line
    inside it: the wrapper file itself is one or two lines long, so its own line numbers would mislead."""
    try:
        return parse_python(source)
    except SyntaxError as exc:
        if not layers:
            raise
        raise UnwrapError(
            f"decoded payload {len(layers)} ({describe_layers(layers)}) is not valid Python: {exc.msg} "
            f"(line {exc.lineno} of the decoded text)"
        ) from exc


def unwrap(source: str) -> Unwrapped:
    """Peel self-extracting layers off ``source`` until plain code remains.

    A file without a decodable ``exec`` payload is returned unchanged (zero layers). An ``exec`` whose argument
    is not a literal payload (``exec(open(...).read())``) is left alone and noted. Raises ``SyntaxError`` for text
    that is not Python and ``UnwrapError`` for a payload that is recognised but cannot be decoded safely.
    """
    result = Unwrapped(source=source)
    for _ in range(MAX_LAYERS + 1):
        module = _parse_layer(result.source, result.layers)
        decoded: str | None = None
        for call in _exec_calls(module):
            evaluator = _StaticEvaluator(module)
            try:
                value = evaluator.evaluate(call.args[0])
            except _NotStatic:
                result.notes.append(f"exec() at line {call.lineno} runs a non-literal expression; not followed")
                continue
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise UnwrapError(f"payload exec'd at line {call.lineno} is not UTF-8 text: {exc}") from exc
            if not isinstance(value, str) or not evaluator.codecs:
                result.notes.append(f"exec() at line {call.lineno} runs a plain literal; not followed")
                continue
            if decoded is not None:
                raise UnwrapError(f"more than one self-extracting payload (second at line {call.lineno})")
            decoded = value
            for key, value_text in _env_overrides(module).items():
                result.env_overrides.setdefault(key, value_text)
            result.layers.append(Layer(line=call.lineno, codecs=tuple(evaluator.codecs)))
        if decoded is None:
            result.tree = module
            return result
        result.source = decoded
    raise UnwrapError(f"more than {MAX_LAYERS} nested self-extracting layers")
