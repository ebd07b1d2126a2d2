"""The C/Python ABI, read from the BPF headers (core/bpf/lib/*.h): their one definition.

Constants, flags, timeouts, counter slots and struct layouts shared by the programs and the
agent are written once, in C. Python reads them from the same header files the loader
compiles (kpr.bpf.inline.BPF_DIR / "lib", installed as package data), instead of repeating
them by hand, so a reordered counter or a changed field cannot silently disagree:

    abi.value("KPR_CT_F_SNAT")                      # 8
    abi.counters("KPR_NP_ST_", names={...})         # slot order, named by the C names
    abi.packer("kpr_svc_key")                       # struct.Struct("=16sHBBHH")
    abi.ctype("kpr_svc_key")                        # a ctypes.Structure with the C fields

The parser knows the header style used here, not C at large: object-like `#define KPR_X value
// comment` (integer expressions of other defines, strings), `#ifndef KPR_X` defaults, structs
and unions of fixed-width fields (`__u8`..`__u64`, `__be16`/`__be32`, nested `union kpr_addr`
and structs, arrays such as `__u8 pad[3]`), `__attribute__((packed))` and `((aligned(N)))`, and the sizes the
headers `_Static_assert`. Anything else (function-like macros, a struct with `#if` inside, a
function pointer) is left alone until someone asks for it; then AbiError names what it is.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kpr.bpf.inline import BPF_DIR

__all__ = [
    "Abi",
    "AbiError",
    "CType",
    "Define",
    "Field",
    "LIB_DIR",
    "counters",
    "ctype",
    "default",
    "group",
    "leaves",
    "packer",
    "read_xmacro",
    "struct_of",
    "value",
    "xmacro",
]

# Where the loader finds the headers (`#include "lib/x.h"` under BPF_DIR), source tree or wheel.
LIB_DIR = BPF_DIR / "lib"


class AbiError(RuntimeError):
    """A constant, counter list or struct cannot be read from the headers; the message names it."""


# --- types --------------------------------------------------------------------------------

# C scalar type -> (size, struct format code, ctypes type). Byte order is the host's ("="), as
# the programs store them; __be* fields hold bytes already in network order.
_SCALARS: dict[str, tuple[int, str, type]] = {
    "__u8": (1, "B", ctypes.c_uint8),
    "__s8": (1, "b", ctypes.c_int8),
    "char": (1, "b", ctypes.c_int8),
    "__u16": (2, "H", ctypes.c_uint16),
    "__be16": (2, "H", ctypes.c_uint16),
    "__s16": (2, "h", ctypes.c_int16),
    "__u32": (4, "I", ctypes.c_uint32),
    "__be32": (4, "I", ctypes.c_uint32),
    "__s32": (4, "i", ctypes.c_int32),
    "int": (4, "i", ctypes.c_int32),
    "__u64": (8, "Q", ctypes.c_uint64),
    "__be64": (8, "Q", ctypes.c_uint64),
    "__s64": (8, "q", ctypes.c_int64),
}


@dataclass(frozen=True)
class Define:
    name: str
    text: str  # the replacement text, comment removed
    comment: str
    header: str  # file name under LIB_DIR
    line: int
    # Inside an #if/#ifdef other than the include guard and its own #ifndef default: the value
    # depends on build flags.
    conditional: bool = False


@dataclass(frozen=True)
class Field:
    name: str
    ctype: str  # "__u16", "union kpr_addr", "struct kpr_backend"
    count: int | None  # array length; None for a single value
    offset: int
    size: int  # of the whole field (all elements)


@dataclass(frozen=True)
class CType:
    """One struct or union as the compiler lays it out (natural alignment, or packed)."""

    kind: str  # "struct" or "union"
    name: str
    fields: tuple[Field, ...]
    size: int
    align: int
    header: str
    packed: bool = False

    def field_names(self, skip: Iterable[str] = ()) -> tuple[str, ...]:
        skip = set(skip)
        return tuple(f.name for f in self.fields if f.name not in skip)

    def format(self, skip: Iterable[str] = ()) -> str:
        """A struct-module format ("=" no padding, host order) of the same bytes: one value per
        field (bytes for a nested struct, union or __u8 array, n values for other arrays),
        pad bytes ("x") for the fields named in `skip` and for any padding the compiler adds."""
        if self.kind == "union":
            return f"={self.size}s"
        skip = set(skip)
        unknown = skip - {f.name for f in self.fields}
        if unknown:
            raise AbiError(f"struct {self.name} ({self.header}) has no field {', '.join(sorted(unknown))}")
        out, pos = [], 0
        for f in self.fields:
            if f.offset > pos:
                out.append(_pad(f.offset - pos))
            pos = f.offset + f.size
            if f.name in skip:
                out.append(_pad(f.size))
            elif f.ctype in _SCALARS and f.count is None:
                out.append(_SCALARS[f.ctype][1])
            elif f.ctype in _SCALARS and _SCALARS[f.ctype][0] > 1:
                out.append(f"{f.count}{_SCALARS[f.ctype][1]}")
            else:  # bytes: a __u8/char array, a nested struct or union
                out.append(f"{f.size}s")
        if self.size > pos:
            out.append(_pad(self.size - pos))
        return "=" + "".join(out)

    def packer(self, skip: Iterable[str] = ()) -> struct.Struct:
        return struct.Struct(self.format(skip))


def _pad(n: int) -> str:
    return "x" if n == 1 else f"{n}x"


# --- parsing --------------------------------------------------------------------------------

_COMMENT_BLOCK = re.compile(r"/\*.*?\*/", re.S)
_DEFINE = re.compile(r"^\s*#\s*define\s+(\w+)(\(?)(.*)$")
_COND = re.compile(r"^\s*#\s*(if|ifdef|ifndef|elif|else|endif)\b\s*(\w*)")
_TYPE_BLOCK = re.compile(
    r"^(struct|union)\s+(\w+)\s*\{(.*?)^\}\s*"
    r"(?:__attribute__\s*\(\(\s*(?:(packed)|aligned\s*\(\s*(\d+)\s*\))\s*\)\))?\s*;",
    re.S | re.M
)
_FIELD = re.compile(r"^((?:union|struct)\s+\w+|\w+)\s+(\w+)\s*(?:\[\s*([^\]]+?)\s*\])?$")
_ASSERT = re.compile(r"_Static_assert\s*\(\s*sizeof\s*\(\s*(struct|union)\s+(\w+)\s*\)\s*==\s*(\d+)")
_INT = re.compile(r"\b(0[xX][0-9a-fA-F]+|\d+)[uUlL]*\b")
_GUARD = re.compile(r"^KPR_LIB_\w+_H$")


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, line) with backslash continuations joined."""
    out: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        out.append((start, buf + line))
        buf = ""
    if buf:
        out.append((start, buf))
    return out


def _split_comment(rest: str) -> tuple[str, str]:
    body, sep, comment = rest.partition("//")
    body = _COMMENT_BLOCK.sub(" ", body)
    if not sep:
        m = re.search(r"/\*(.*?)\*/", rest)
        comment = m[1] if m else ""
    return body.strip(), comment.strip()


class Abi:
    """Every header of one lib directory, parsed once; types and values resolved on demand."""

    def __init__(self, lib_dir: Path | str = LIB_DIR) -> None:
        self.lib_dir = Path(lib_dir)
        self.defines: dict[str, list[Define]] = {}
        self.function_macros: set[str] = set()
        # name -> (kind, header, body, packed, aligned(N) or 1); resolved into CType by struct_of()
        self._raw_types: dict[str, tuple[str, str, str, bool, int]] = {}
        self.asserted_sizes: dict[str, tuple[int, str]] = {}  # type name -> (size, header)
        self._types: dict[str, CType] = {}
        self._values: dict[str, int | str] = {}
        headers = sorted(self.lib_dir.glob("*.h"))
        if not headers:
            raise AbiError(f"no BPF headers under {self.lib_dir}: is kpr installed with its package data?")
        for path in headers:
            self._parse(path)

    # -- reading files

    def _parse(self, path: Path) -> None:
        text = path.read_text()
        name = path.name
        # Conditional frames: the define a frame's #ifndef guards ("" for #if/#ifdef/#else).
        frames: list[str] = []
        for lineno, line in _logical_lines(text):
            c = _COND.match(line)
            if c:
                kw, arg = c[1], c[2]
                if kw in ("if", "ifdef", "ifndef"):
                    frames.append(arg if kw == "ifndef" else "")
                elif kw in ("elif", "else") and frames:
                    frames[-1] = ""
                elif kw == "endif" and frames:
                    frames.pop()
                continue
            d = _DEFINE.match(line)
            if not d:
                continue
            macro, paren, rest = d[1], d[2], d[3]
            if paren:
                self.function_macros.add(macro)
                continue
            body, comment = _split_comment(rest)
            conditional = any(f != macro and not _GUARD.match(f) for f in frames)
            self.defines.setdefault(macro, []).append(Define(macro, body, comment, name, lineno, conditional))
        for m in _TYPE_BLOCK.finditer(text):
            self._raw_types.setdefault(m[2], (m[1], name, m[3], bool(m[4]), int(m[5] or 1)))
        for m in _ASSERT.finditer(text):
            self.asserted_sizes[m[2]] = (int(m[3]), name)

    # -- values

    def define(self, name: str) -> Define:
        defs = self.defines.get(name)
        if not defs:
            raise AbiError(f"{name} is not #defined in any header under {self.lib_dir}")
        texts = {d.text for d in defs}
        if len(texts) > 1 or defs[0].conditional:
            where = ", ".join(f"{d.header}:{d.line} {d.text!r}" for d in defs)
            raise AbiError(f"{name} depends on build flags ({where}): Python cannot know its value")
        return defs[0]

    def value(self, name: str) -> int:
        """The integer value of an object-like #define (its #ifndef default when there is one)."""
        v = self._eval(name, ())
        if not isinstance(v, int):
            raise AbiError(f"{name} is not an integer: {v!r}")
        return v

    def string(self, name: str) -> str:
        v = self._eval(name, ())
        if not isinstance(v, str):
            raise AbiError(f"{name} is not a string: {v!r}")
        return v

    def _eval(self, name: str, seen: tuple[str, ...]) -> int | str:
        if name in self._values:
            return self._values[name]
        if name in seen:
            raise AbiError(f"{name} is defined in terms of itself ({' -> '.join(seen + (name,))})")
        d = self.define(name)
        text = d.text
        if re.fullmatch(r'"[^"]*"', text):
            v: int | str = text[1:-1]
        else:
            expr = _INT.sub(lambda m: str(int(m[1], 0)), text)
            try:
                tree = ast.parse(expr, mode="eval")
            except SyntaxError:
                raise AbiError(f"{name} ({d.header}:{d.line}): cannot read {text!r} as an integer expression") from None
            v = self._calc(tree.body, name, d, seen + (name,))
        self._values[name] = v
        return v

    def _calc(self, node: ast.AST, name: str, d: Define, seen: tuple[str, ...]) -> int:
        ops = {
            ast.Add: lambda a, b: a + b,
            ast.Sub: lambda a, b: a - b,
            ast.Mult: lambda a, b: a * b,
            ast.Div: lambda a, b: a // b,
            ast.FloorDiv: lambda a, b: a // b,
            ast.Mod: lambda a, b: a % b,
            ast.LShift: lambda a, b: a << b,
            ast.RShift: lambda a, b: a >> b,
            ast.BitOr: lambda a, b: a | b,
            ast.BitAnd: lambda a, b: a & b,
            ast.BitXor: lambda a, b: a ^ b,
        }
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            v = self._eval(node.id, seen)
            if isinstance(v, int):
                return v
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](self._calc(node.left, name, d, seen), self._calc(node.right, name, d, seen))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Invert, ast.UAdd)):
            v = self._calc(node.operand, name, d, seen)
            return -v if isinstance(node.op, ast.USub) else (~v if isinstance(node.op, ast.Invert) else v)
        raise AbiError(f"{name} ({d.header}:{d.line}): cannot evaluate {d.text!r} as an integer")

    def group(self, prefix: str, *, exclude: Iterable[str] = ()) -> dict[str, int]:
        """SUFFIX -> value of every integer `#define <prefix><SUFFIX>`, in value order.

        `exclude` names suffixes that are no members (MAX, COUNT, ...)."""
        exclude = set(exclude)
        out = {
            macro[len(prefix):]: self.value(macro)
            for macro in self.defines
            if macro.startswith(prefix) and macro[len(prefix):] not in exclude
        }
        if not out:
            raise AbiError(f"no #define {prefix}* in any header under {self.lib_dir}")
        return dict(sorted(out.items(), key=lambda kv: (kv[1], kv[0])))

    def counters(
        self, prefix: str, *, names: Mapping[str, str] | None = None, max_name: str = "MAX", exclude: Iterable[str] = ()
    ) -> tuple[str, ...]:
        """Names of the counter slots `#define <prefix><SUFFIX> <slot>`, in slot order.

        A slot's name is its suffix in lower case, or names[SUFFIX] where the published name
        (status, metrics) differs. The slots must be 0..<prefix>MAX-1, each used once; a key of
        `names` that is no counter is an error too (the counter was renamed or removed)."""
        slots = self.group(prefix, exclude={max_name, *exclude})
        names = dict(names or {})
        stale = sorted(set(names) - set(slots))
        if stale:
            raise AbiError(f"names given for counters the headers do not have: {', '.join(prefix + s for s in stale)}")
        by_slot: dict[int, str] = {}
        for suffix, slot in slots.items():
            if slot in by_slot:
                raise AbiError(f"{prefix}{suffix} and {prefix}{by_slot[slot]} share slot {slot}")
            by_slot[slot] = suffix
        total = self.value(prefix + max_name)
        if sorted(by_slot) != list(range(total)):
            missing = sorted(set(range(total)) - set(by_slot))
            extra = sorted(set(by_slot) - set(range(total)))
            raise AbiError(
                f"{prefix}* slots are not 0..{prefix}{max_name}-1 ({total}): "
                f"missing {missing}, out of range {[prefix + by_slot[s] for s in extra]}"
            )
        out = tuple(names.get(by_slot[i], by_slot[i].lower()) for i in range(total))
        dup = sorted({n for n in out if out.count(n) > 1})
        if dup:
            raise AbiError(f"{prefix}* counters share the name {', '.join(dup)}")
        return out

    def xmacro(self, header: str, macro: str, arg: int) -> tuple[str, ...]:
        """Argument `arg` of every `MACRO(a, b, ...)` line of an X-macro list file, in order."""
        return read_xmacro(self.lib_dir / header, macro, arg)

    # -- types

    def struct_of(self, name: str) -> CType:
        """The layout of `struct name` or `union name`."""
        if name in self._types:
            return self._types[name]
        raw = self._raw_types.get(name)
        if raw is None:
            raise AbiError(f"no struct or union {name} in any header under {self.lib_dir}")
        kind, header, body, packed, min_align = raw
        where = f"{kind} {name} ({header})"
        if re.search(r"^\s*#", body, re.M):
            raise AbiError(f"{where} has preprocessor lines inside: its layout depends on build flags")
        body = _COMMENT_BLOCK.sub(" ", re.sub(r"//[^\n]*", "", body))
        fields, offset, size, align = [], 0, 0, min_align
        for decl in (s.strip() for s in body.split(";")):
            if not decl:
                continue
            m = _FIELD.match(" ".join(decl.split()))
            if not m:
                raise AbiError(f"{where}: cannot read the field {decl!r}")
            ctype_, fname, count_text = m[1], m[2], m[3]
            if ctype_ in _SCALARS:
                esize, ealign = _SCALARS[ctype_][0], _SCALARS[ctype_][0]
            elif ctype_.split()[0] in ("struct", "union"):
                inner = self.struct_of(ctype_.split()[1])
                esize, ealign = inner.size, inner.align
            else:
                raise AbiError(f"{where}: field {fname} has the unknown type {ctype_}")
            count = None
            if count_text is not None:
                count = int(count_text, 0) if re.fullmatch(r"\d+|0x[0-9a-fA-F]+", count_text) else self.value(count_text)
            fsize = esize * (count or 1)
            if packed:
                ealign = 1
            align = max(align, ealign)
            if kind == "union":
                foff = 0
                size = max(size, fsize)
            else:
                foff = -(-offset // ealign) * ealign
                offset = foff + fsize
                size = offset
            fields.append(Field(fname, ctype_, count, foff, fsize))
        if not fields:
            raise AbiError(f"{where} has no fields")
        size = -(-size // align) * align
        t = CType(kind, name, tuple(fields), size, align, header, packed)
        asserted = self.asserted_sizes.get(name)
        if asserted is not None and asserted[0] != size:
            raise AbiError(f"{where}: the fields add up to {size} bytes, but the header asserts {asserted[0]}")
        self._types[name] = t
        return t

    def packer(self, name: str, skip: Iterable[str] = ()) -> struct.Struct:
        return self.struct_of(name).packer(skip)

    @functools.cache  # noqa: B019 - one ctypes class per type and Abi, for the process
    def ctype(self, name: str, *, unions_as_bytes: bool = False) -> type:
        """A ctypes.Structure (or Union) with the C fields, names and layout. With
        unions_as_bytes, a union field (union kpr_addr) is a __u8 array of its size instead:
        what code that copies addresses in and out as bytes wants."""
        t = self.struct_of(name)
        fields: list[tuple[str, object]] = []
        for f in t.fields:
            kind, _, inner = f.ctype.partition(" ")
            if f.ctype in _SCALARS:
                base: object = _SCALARS[f.ctype][2]
            elif kind == "union" and unions_as_bytes:
                base = ctypes.c_uint8 * self.struct_of(inner).size
            else:
                base = self.ctype(inner, unions_as_bytes=unions_as_bytes)
            fields.append((f.name, base * f.count if f.count is not None else base))  # type: ignore[operator]
        cls_base = ctypes.Union if t.kind == "union" else ctypes.Structure
        attrs: dict[str, object] = {"__doc__": f"{t.kind} {t.name} ({t.header}), read from the header."}
        if t.packed:
            attrs["_pack_"] = 1
        attrs["_fields_"] = fields
        cls = type(_camel(name), (cls_base,), attrs)
        if ctypes.sizeof(cls) != t.size:
            raise AbiError(f"{t.kind} {name}: ctypes lays it out in {ctypes.sizeof(cls)} bytes, the header in {t.size}")
        # (ctypes knows no aligned(N): a field of such a type placed where C would not put it)
        for f in t.fields:
            if getattr(cls, f.name).offset != f.offset:
                raise AbiError(f"{t.kind} {name}: ctypes puts {f.name} at {getattr(cls, f.name).offset}, the header at {f.offset}")
        return cls

    def types(self) -> list[str]:
        """Every struct and union name the headers define (parseable or not)."""
        return sorted(self._raw_types)


def read_xmacro(path: Path, macro: str, arg: int) -> tuple[str, ...]:
    """Argument `arg` of every `MACRO(a, b, ...)` line of one X-macro list file, in order: the
    style of a list C expands into an enum (lib/arp_counters.h)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise AbiError(f"{path}: {exc.strerror}") from None
    out = []
    for m in re.finditer(rf"^{re.escape(macro)}\(([^)]*)\)", text, re.M):
        args = [a.strip() for a in m[1].split(",")]
        if len(args) <= arg:
            raise AbiError(f"{path}: {m[0]} has no argument {arg}")
        out.append(args[arg])
    if not out:
        raise AbiError(f"{path}: no {macro}(...) lines")
    return tuple(out)


def leaves(cls: type, base: int = 0, prefix: str = "") -> list[tuple[str, int, int]]:
    """(field path, offset, size) of every leaf field of a ctypes struct or union: two layouts
    agree when these do (a generated mirror against bcc's view of the C type)."""
    out = []
    for name, ftype, *_ in cls._fields_:  # type: ignore[attr-defined]
        desc = getattr(cls, name)
        path = f"{prefix}{name}"
        if isinstance(ftype, type) and issubclass(ftype, (ctypes.Structure, ctypes.Union)):
            out.extend(leaves(ftype, base + desc.offset, path + "."))
        else:
            out.append((path, base + desc.offset, desc.size))
    return out


def _camel(name: str) -> str:
    return "".join(p.capitalize() for p in name.split("_"))


@functools.cache
def default() -> Abi:
    """The headers the loader compiles (parsed once per process)."""
    return Abi(LIB_DIR)


def value(name: str) -> int:
    return default().value(name)


def group(prefix: str, *, exclude: Iterable[str] = ()) -> dict[str, int]:
    return default().group(prefix, exclude=exclude)


def counters(
    prefix: str, *, names: Mapping[str, str] | None = None, max_name: str = "MAX", exclude: Iterable[str] = ()
) -> tuple[str, ...]:
    return default().counters(prefix, names=names, max_name=max_name, exclude=exclude)


def xmacro(header: str, macro: str, arg: int) -> tuple[str, ...]:
    return default().xmacro(header, macro, arg)


def struct_of(name: str) -> CType:
    return default().struct_of(name)


def packer(name: str, skip: Iterable[str] = ()) -> struct.Struct:
    return default().packer(name, skip)


def ctype(name: str, *, unions_as_bytes: bool = False) -> type:
    return default().ctype(name, unions_as_bytes=unions_as_bytes)
