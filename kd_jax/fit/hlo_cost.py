"""FLOPs and bytes of a compiled XLA program with every loop body counted as often as it runs.

`compiled.cost_analysis()` (XLA's HloCostAnalysis) adds a `while` loop's body to its total ONCE,
whatever the trip count: a train step that scans over its layers (lax.scan lowers to a while) and a
loss that scans over token chunks report a fraction of their work (a 10-step scan of a 1024x1024
matmul reports one matmul's FLOPs, on the CPU and the TPU compiler alike).
`program_cost(compiled.as_text())` reads the optimized HLO text instead and multiplies the cost of
every computation by how many times it runs. For an SPMD program the numbers are one device's.

How often a computation runs:

- ENTRY once; a `while` body (its caller's count) x (trip count), its condition once more than
  that. The trip count is the `known_trip_count` the compiler puts in the while's backend_config
  (the CPU compiler does), else it is read from the condition: a ROOT `compare` (directly or in a
  fusion; LT, LE, GT or GE, either operand order) of loop-state element i against a constant or a
  loop-invariant element with a constant initial value; the start is element i of the while's init
  tuple (a constant, through copies/converts), the step the constant the body's ROOT tuple adds to
  element i. jax's scans and fori_loops count from 0 by 1, which is assumed where the start or step
  cannot be read. A trip count not found (a loop over data) counts 1 and adds to
  `unknown_trip_counts`.
- a fusion's computation as often as the fusion (its instructions give the FLOPs; the bytes are the
  fusion's own operands and outputs); a `call`'s and an async wrapper's (`async-start`, `calls=`)
  as often as the call; EVERY branch of a `conditional` once per execution of the conditional (an
  upper bound: HloCostAnalysis takes the costliest branch instead).
- the scalar computations of reduce, reduce-window, scatter, sort, map and all-reduce (`to_apply=`)
  are not walked as code: their FLOPs per application multiply the op's count, as in XLA.

FLOPs, as HloCostAnalysis counts them: dot = 2 x output elements x contracted size; convolution
(the TPU compiler lowers dots to convolutions) = 2 x (input features / feature_group_count) x
output features x (batch / batch_group_count) x, per spatial dimension, the (output position,
kernel position) pairs that read a real input element (GetConvolutionFlops; counted arithmetically,
see `valid_pairs`); 1 per output element of an elementwise op (add, multiply, select, compare,
convert, ...), the transcendental ones (exponential, log, tanh, rsqrt, power, ...) counted as
`transcendentals` instead; reduce = (input - output elements) x the reducer's FLOPs; reduce-window =
(window - 1) x output elements x the reducer's FLOPs (one exception, `_reduce_window_count`); sort =
n x ceil(log2 n); scatter = updates x the combiner's FLOPs; all-reduce = output elements. A custom
call (a Mosaic `tpu_custom_call`, ...) counts the FLOPs and transcendentals of the `cost_estimate`
in its backend_config (a Pallas kernel's `pl.CostEstimate`; the TPU compiler counts it too) and 0
without one; every custom call but the compiler's bookkeeping ones (BOOKKEEPING_TARGETS) is listed
in `custom_calls`, with its estimate where it has one, so a caller can say which kernels' work is
missing (`custom_call_flops` is the estimated part of "flops"). Not counted (0): fft, cholesky,
triangular-solve, rng, select-and-scatter.

Bytes accessed, per top-level (not fused) instruction: its operands' bytes + its output's bytes, with
XLA's refinements: slice, dynamic-slice and gather read what they output; a dynamic-update-slice
reads and writes its update only (in place); a fusion reads, per parameter, what
FusionParameterReadBytes counts (see `_Walker.param_read`) and writes its outputs, a
dynamic-update-slice or scatter output only its update. Not counted: parameter, constant,
get-tuple-element, tuple, bitcast, opt-barrier, and while/call/conditional/async wrappers themselves
(their computations count); copy-start/copy-done count once, as a copy (read + write); a
collective's -start counts its operands and its -done its result. Sizes: `bytes_accessed` pads each
array to its layout's first tile where the layout has one (TPU: `bf16[2,100]{1,0:T(8,128)(2,1)}`
is 8 x 128 x 2 bytes; that is what sits in HBM and what the TPU compiler counts),
`bytes_accessed_logical` is elements x dtype size (pred/s8/u8/f8: 1, bf16/f16/s16/u16: 2,
f32/s32/u32: 4, f64/s64/u64/c64: 8, c128: 16, s4/u4: 0.5, token: 0).

Where the TPU compiler's cost_analysis counts more bytes on the same program (measured, loops
counted once on both sides): it counts an async copy as copy-start's operand + its whole output
tuple (destination, source, context) + copy-done's, about 2 x the array + 4.5 KiB more than a copy,
and for each get-tuple-element of a multi-output fusion the whole tuple it picks from; both are
bookkeeping, not memory traffic, and are left out here. Also: a fused gather reads the rows it
gathers here (XLA: the whole table), a fused scatter the rows it updates (XLA: the whole operand),
and a fused parameter read through a bitcast into slices only the slices (XLA: all of it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re

__all__ = ["DTYPE_BYTES", "parse_module", "program_cost", "type_bytes"]

DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25,
    "s1": 0.125, "u1": 0.125, "token": 0, "f4e2m1fn": 0.5, "f8e8m0fnu": 1,
}


def _dtype_bytes(dtype: str) -> float:
    if dtype in DTYPE_BYTES:
        return DTYPE_BYTES[dtype]
    if dtype.startswith("f8"):
        return 1
    if dtype.startswith("f4"):
        return 0.5
    return 0  # opaque and unknown types


# Elementwise opcodes HloCostAnalysis counts as 1 FLOP per output element (HandleElementwiseOp).
ELEMENTWISE = frozenset({
    "abs", "add", "and", "atan2", "bitcast-convert", "cbrt", "ceil", "clamp", "count-leading-zeros",
    "compare", "complex", "convert", "cosine", "divide", "erf", "exponential", "exponential-minus-one",
    "floor", "imag", "is-finite", "log", "log-plus-one", "logistic", "maximum", "minimum", "multiply",
    "negate", "not", "or", "popcnt", "power", "real", "reduce-precision", "remainder", "round-nearest-afz",
    "round-nearest-even", "rsqrt", "shift-left", "shift-right-arithmetic", "shift-right-logical", "select",
    "sign", "sine", "sqrt", "stochastic-convert", "subtract", "tan", "tanh", "xor",
})
# ...of which these count as transcendentals instead of FLOPs.
TRANSCENDENTAL = frozenset({
    "erf", "exponential", "log", "logistic", "power", "sqrt", "cbrt", "rsqrt", "tanh", "sine", "cosine",
    "exponential-minus-one", "log-plus-one", "atan2", "tan",
})

# Custom-call targets that are compiler bookkeeping, not kernels: left out of `custom_calls`.
BOOKKEEPING_TARGETS = frozenset({
    "AllocateBuffer", "AssumeGatherIndicesInBound", "GatherScatterIndicesBitpacked", "Sharding",
    "SPMDFullToShardShape", "SPMDShardToFullShape", "LayoutConstraint", "MoveToHost", "MoveToDevice",
    "annotate_device_placement",
    "AsyncCollectiveStart", "AsyncCollectiveDone", "ConcatBitcast",  # the TPU compiler's collective plumbing
})

# Top-level instructions whose bytes are not counted: no data movement of their own, or their
# called computations count instead.
_NO_BYTES = frozenset({
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier", "while", "call",
    "conditional", "after-all", "partition-id", "replica-id", "async-start", "async-update", "async-done",
    "add-dependency", "domain",
})


# ---------------------------------------------------------------- parsing


@dataclasses.dataclass
class Instruction:
    name: str
    type: str  # the result type as printed: "bf16[2,128]{1,0:T(8,128)(2,1)}" or a tuple "(s32[], ...)"
    opcode: str
    operands: list[str]  # operand names (no %), or the literal text of a constant
    attrs: dict[str, str]  # attribute name -> its text as printed
    root: bool = False


@dataclasses.dataclass
class Computation:
    name: str
    entry: bool
    instructions: list[Instruction]
    by_name: dict[str, Instruction]
    _params: dict[int, Instruction] | None = dataclasses.field(default=None, repr=False)

    @property
    def root(self) -> Instruction:
        for ins in self.instructions:
            if ins.root:
                return ins
        return self.instructions[-1]

    def parameter(self, index: int) -> Instruction | None:
        if self._params is None:
            self._params = {int(ins.operands[0]): ins for ins in self.instructions
                            if ins.opcode == "parameter" and ins.operands and ins.operands[0].strip().isdigit()}
        return self._params.get(index)


_OPEN, _CLOSE = "([{", ")]}"
_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(")
_LHS = re.compile(r"^\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*")
_OPCODE = re.compile(r"([a-z][a-z0-9\-_]*)\(")
_COMMENT = re.compile(r"/\*.*?\*/")


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start] (quotes respected)."""
    depth, i, n, quote = 0, start, len(text), False
    while i < n:
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == '"':
                quote = False
        elif c == '"':
            quote = True
        elif c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return n


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets and quotes."""
    parts, depth, quote, cur, i = [], 0, False, [], 0
    while i < len(text):
        c = text[i]
        if quote:
            cur.append(c)
            if c == "\\" and i + 1 < len(text):
                cur.append(text[i + 1])
                i += 1
            elif c == '"':
                quote = False
        elif c == '"':
            quote = True
            cur.append(c)
        elif c in _OPEN:
            depth += 1
            cur.append(c)
        elif c in _CLOSE:
            depth -= 1
            cur.append(c)
        elif c == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def _parse_instruction(line: str) -> Instruction | None:
    if "/*" in line:  # long tuples and operand lists carry /*index=5*/ markers
        line = _COMMENT.sub("", line)
    m = _LHS.match(line)
    if not m:
        return None
    root, name = bool(m.group(1)), m.group(2)
    i = m.end()
    if i < len(line) and line[i] == "(":  # tuple type
        j = _balanced(line, i)
    else:  # array type: up to the first space outside brackets
        j, depth = i, 0
        while j < len(line) and not (line[j] == " " and depth == 0):
            if line[j] in _OPEN:
                depth += 1
            elif line[j] in _CLOSE:
                depth -= 1
            j += 1
    type_ = line[i:j]
    om = _OPCODE.match(line, j + 1 if j < len(line) and line[j] == " " else j)
    if not om:
        return None
    opcode = om.group(1)
    k = _balanced(line, om.end() - 1)
    inner = line[om.end():k - 1]
    if opcode == "constant":
        operands = [inner]
    else:
        operands = []
        for op in _split_top(inner):
            tok = op.split()[-1] if op.split() else op
            operands.append(tok.lstrip("%"))
    attrs = {}
    rest = line[k:].strip()
    if rest.startswith(","):
        for part in _split_top(rest[1:]):
            key, eq, value = part.partition("=")
            if eq:
                attrs[key.strip()] = value.strip()
    return Instruction(name, type_, opcode, operands, attrs, root)


def parse_module(hlo_text: str) -> dict[str, Computation]:
    """The computations of an HLO module's text, by name, in printed order (ENTRY last)."""
    comps: dict[str, Computation] = {}
    cur: Computation | None = None
    for line in hlo_text.splitlines():
        if cur is None:
            if line and not line[0].isspace() and line.rstrip().endswith("{"):
                m = _HEADER.match(line)
                if m and not line.startswith("HloModule"):
                    cur = Computation(m.group(2), bool(m.group(1)), [], {})
            continue
        if line.strip() == "}" and not line[0].isspace():
            comps[cur.name] = cur
            cur = None
            continue
        ins = _parse_instruction(line)
        if ins is not None:
            cur.instructions.append(ins)
            cur.by_name[ins.name] = ins
    return comps


# ---------------------------------------------------------------- shapes

_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([^\]]*)\](\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})?")


@functools.lru_cache(maxsize=65536)
def _arrays(type_: str) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """(dtype, dims, layout text) of each array in a (possibly tuple) type."""
    out = []
    for m in _ARRAY.finditer(type_):
        dims = tuple(int(d.replace("<=", "")) for d in m.group(2).split(",") if d.strip())
        out.append((m.group(1), dims, m.group(3) or ""))
    return tuple(out)


def _elements(type_: str) -> int:
    return sum(math.prod(d) for _, d, _ in _arrays(type_))


@functools.lru_cache(maxsize=65536)
def _tiled_elements(dims: tuple[int, ...], layout: str) -> int:
    """Elements of an array as laid out: the first tile of a TPU layout pads the minor dimensions."""
    body = layout[1:-1] if layout else ""
    order, _, extra = body.partition(":")
    tile = re.search(r"T\(([^)]*)\)", extra) if extra else None
    if not tile:
        return math.prod(dims)
    try:
        m2m = [int(x) for x in order.split(",") if x.strip()]
    except ValueError:
        m2m = []
    if len(m2m) != len(dims):
        m2m = list(range(len(dims) - 1, -1, -1))
    physical = [dims[i] for i in reversed(m2m)]  # major to minor
    t = [int(x) if x.strip().isdigit() else 1 for x in tile.group(1).split(",")]
    if len(t) > len(physical):
        physical = [1] * (len(t) - len(physical)) + physical
    for k in range(1, len(t) + 1):
        physical[-k] = -(-physical[-k] // t[-k]) * t[-k]
    return math.prod(physical)


def type_bytes(type_: str, tiled: bool = True) -> float:
    """Bytes of an HLO type as printed (an array or a tuple of them): with `tiled`, as the layout's
    tiling pads it (`bf16[2,100]{1,0:T(8,128)(2,1)}`: 8 x 128 x 2), else elements x dtype size."""
    total = 0.0
    for dtype, dims, layout in _arrays(type_):
        n = _tiled_elements(dims, layout) if tiled else math.prod(dims)
        total += n * _dtype_bytes(dtype)
    return total


def _dims(type_: str) -> tuple[int, ...]:
    arrays = _arrays(type_)
    return arrays[0][1] if arrays else ()


def _ints(text: str | None) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text or "")]


def _comp_names(text: str | None) -> list[str]:
    return [n.lstrip("%") for n in re.findall(r"%?([\w.\-]+)", text or "")]


# ---------------------------------------------------------------- FLOPs of single ops


def _dot_flops(ins: Instruction, comp: Computation) -> float:
    lhs = comp.by_name.get(ins.operands[0])
    lhs_dims = _dims(lhs.type) if lhs else []
    contracted = math.prod(lhs_dims[d] for d in _ints(ins.attrs.get("lhs_contracting_dims")) if d < len(lhs_dims))
    return 2.0 * _elements(ins.type) * contracted


def _window(text: str | None, rank: int) -> list[dict[str, int]]:
    """window={size=1x2 stride=.. pad=0_0x1_1 lhs_dilate=.. rhs_dilate=..} -> one dict per spatial dim."""
    dims = [{"size": 1, "stride": 1, "pad_lo": 0, "pad_hi": 0, "lhs_dilate": 1, "rhs_dilate": 1} for _ in range(rank)]
    if not text:
        return dims
    for key, value in re.findall(r"(\w+)=([^\s}]+)", text):
        parts = value.split("x")
        for d, p in enumerate(parts[:rank]):
            if key == "pad":
                lo, _, hi = p.partition("_")
                dims[d]["pad_lo"], dims[d]["pad_hi"] = int(lo), int(hi)
            elif key in ("size", "stride", "lhs_dilate", "rhs_dilate"):
                dims[d][key] = int(p)
    return dims


def valid_pairs(in_size: int, kernel: int, out_size: int, w: dict[str, int]) -> int:
    """(output position, kernel position) pairs of one spatial dimension that read a real input
    element (not padding, not a hole of lhs dilation): XLA's GetConvolutionFlops loop, counted per
    kernel position with arithmetic instead of a loop over output positions."""
    s, pl, wd, bd = w["stride"], w["pad_lo"], w["rhs_dilate"], w["lhs_dilate"]
    total = 0
    for k in range(kernel):
        c = k * wd - pl  # undilated input index = o*s + c; valid iff divisible by bd and 0 <= it/bd < in_size
        lo = max(0, -(c // s))  # smallest o with o*s + c >= 0: ceil(-c / s)
        hi = min(out_size - 1, ((in_size - 1) * bd - c) // s)  # largest o with o*s + c <= (in-1)*bd
        if hi < lo:
            continue
        if bd == 1:
            total += hi - lo + 1
            continue
        g = math.gcd(s, bd)
        if c % g:
            continue
        m = bd // g  # o*s + c ≡ 0 (mod bd)  <=>  o ≡ o0 (mod m)
        o0 = ((-c // g) * pow(s // g, -1, m)) % m if m > 1 else 0
        first = lo + ((o0 - lo) % m)
        if first <= hi:
            total += (hi - first) // m + 1
    return total


def _reduce_window_count(ins: Instruction, comp: Computation) -> int:
    """Applications of a reduce-window's reducer: (window size - 1) per output element, as
    HloCostAnalysis counts it; except a full reduction broadcast back along one dimension of size d
    (window 2d-1, padding d-1 on both sides: the TPU compiler's form of reduce + broadcast, e.g. a
    softmax's row max), which counts as the reduction, d-1 per row (HloCostAnalysis gives it
    d + rows - 1 in all)."""
    arrays = _arrays(ins.type)
    if not arrays:
        return 0
    out_dims = arrays[0][1]
    n_out = math.prod(out_dims)
    win = _window(ins.attrs.get("window"), len(out_dims))
    src = comp.by_name.get(ins.operands[0]) if ins.operands else None
    in_dims = _dims(src.type) if src else []
    reduced = [i for i, w in enumerate(win) if w["size"] != 1]
    if len(reduced) == 1 and len(in_dims) == len(out_dims):
        i = reduced[0]
        w, d = win[i], in_dims[i]
        if (w["size"] == 2 * d - 1 and w["pad_lo"] == w["pad_hi"] == d - 1 and w["stride"] == 1
                and w["lhs_dilate"] == w["rhs_dilate"] == 1 and out_dims[i] == d and d > 1):
            return (n_out // d) * (d - 1)
    return max(math.prod(w["size"] for w in win) - 1, 0) * n_out


def _conv_flops(ins: Instruction, comp: Computation) -> float:
    lhs, rhs = (comp.by_name.get(n) for n in ins.operands[:2])
    if lhs is None or rhs is None:
        return 0.0
    ld, rd, od = _dims(lhs.type), _dims(rhs.type), _dims(ins.type)
    labels = ins.attrs.get("dim_labels", "")
    m = re.match(r"([^_]+)_([^-]+)->(.+)", labels)
    if not m:
        return 0.0
    lhs_l, rhs_l, out_l = m.groups()

    def spatial(lbl: str) -> dict[int, int]:  # spatial index -> dimension position
        return {int(c): i for i, c in enumerate(lbl) if c.isdigit()}

    ls, rs, os_ = spatial(lhs_l), spatial(rhs_l), spatial(out_l)
    rank = len(ls)
    input_feature = ld[lhs_l.index("f")]
    batch = ld[lhs_l.index("b")]
    output_feature = od[out_l.index("f")]
    fgc = int(ins.attrs.get("feature_group_count", 1))
    bgc = int(ins.attrs.get("batch_group_count", 1))
    win = _window(ins.attrs.get("window"), rank)
    positions = 1
    for d in range(rank):
        positions *= valid_pairs(ld[ls[d]], rd[rs[d]], od[os_[d]], win[d])
    return 2.0 * (input_feature // fgc) * output_feature * (batch // bgc) * positions


# ---------------------------------------------------------------- the walk


@dataclasses.dataclass
class _Cost:
    flops: float = 0.0
    matmul_flops: float = 0.0
    custom_call_flops: float = 0.0
    transcendentals: float = 0.0
    bytes: float = 0.0
    bytes_logical: float = 0.0

    def add(self, other: _Cost, times: float = 1.0) -> None:
        self.flops += other.flops * times
        self.matmul_flops += other.matmul_flops * times
        self.custom_call_flops += other.custom_call_flops * times
        self.transcendentals += other.transcendentals * times
        self.bytes += other.bytes * times
        self.bytes_logical += other.bytes_logical * times


class _Walker:
    def __init__(self, comps: dict[str, Computation], trip_counts: bool = True):
        self.comps = comps
        self.trip_counts = trip_counts
        self.memo: dict[tuple[str, bool], _Cost] = {}
        self.loops: list[tuple[str, int | None]] = []
        self.seen_loops: set[tuple[str, str]] = set()
        self.unknown = 0
        self.custom_calls: list[dict] = []
        self.seen_custom: set[tuple[str, str]] = set()
        self.user_tables: dict[str, dict[str, list[Instruction]]] = {}
        self.read_memo: dict[tuple[str, str, bool], float] = {}

    # -- cost of one execution of a computation (callees included)
    def cost(self, name: str, fused: bool) -> _Cost:
        key = (name, fused)
        if key in self.memo:
            return self.memo[key]
        self.memo[key] = _Cost()  # recursion guard
        comp = self.comps.get(name)
        total = _Cost()
        if comp is not None:
            for ins in comp.instructions:
                total.add(self.instruction(ins, comp, fused))
        self.memo[key] = total
        return total

    def scalar_flops(self, name: str | None) -> float:
        """FLOPs (and transcendentals) of one application of a scalar reducer/comparator."""
        if not name:
            return 0.0
        c = self.cost(name.lstrip("%"), True)
        return c.flops + c.transcendentals

    def instruction(self, ins: Instruction, comp: Computation, fused: bool) -> _Cost:
        op, out = ins.opcode, _Cost()
        n_out = _elements(ins.type)
        # FLOPs
        if op == "dot":
            out.flops = out.matmul_flops = _dot_flops(ins, comp)
        elif op == "convolution":
            out.flops = out.matmul_flops = _conv_flops(ins, comp)
        elif op in ELEMENTWISE:
            if op in TRANSCENDENTAL:
                out.transcendentals = n_out
            else:
                out.flops = n_out
        elif op == "reduce":
            first = comp.by_name.get(ins.operands[0])
            n_in = _elements(first.type) if first else 0
            n_res = math.prod(_arrays(ins.type)[0][1]) if _arrays(ins.type) else 0
            out.flops = max(n_in - n_res, 0) * self.scalar_flops(ins.attrs.get("to_apply"))
        elif op == "reduce-window":
            out.flops = _reduce_window_count(ins, comp) * self.scalar_flops(ins.attrs.get("to_apply"))
        elif op == "scatter":
            upd = comp.by_name.get(ins.operands[-1])
            out.flops = (_elements(upd.type) if upd else 0) * self.scalar_flops(ins.attrs.get("to_apply"))
        elif op == "map":
            out.flops = n_out * self.scalar_flops(ins.attrs.get("to_apply"))
        elif op == "sort":
            first = comp.by_name.get(ins.operands[0])
            n = math.prod(_dims(first.type)) if first else 0
            out.flops = n * math.ceil(math.log2(n)) if n > 1 else 0
        elif op in ("all-reduce", "all-reduce-start", "reduce-scatter"):
            out.flops = n_out
        elif op == "custom-call":
            target = ins.attrs.get("custom_call_target", "").strip('"')
            est = _cost_estimate(ins.attrs.get("backend_config", ""))
            if est:  # a Pallas kernel's CostEstimate: the TPU compiler counts it too
                out.flops = out.custom_call_flops = est.get("flops", 0.0)
                out.transcendentals = est.get("transcendentals", 0.0)
            if target not in BOOKKEEPING_TARGETS and (comp.name, ins.name) not in self.seen_custom:
                self.seen_custom.add((comp.name, ins.name))
                entry = {"name": ins.name, "target": target}
                if est:
                    entry["cost_estimate"] = est
                self.custom_calls.append(entry)
        # called computations
        if op == "fusion":
            out.add(self.cost(ins.attrs.get("calls", "").lstrip("%"), True))
        elif op == "while":
            trip = self.trip_count(ins, comp)
            body = ins.attrs.get("body", "").lstrip("%")
            if (comp.name, ins.name) not in self.seen_loops:
                self.seen_loops.add((comp.name, ins.name))
                self.loops.append((body, trip))
                if trip is None:
                    self.unknown += 1
            n = trip if trip is not None and self.trip_counts else 1
            out.add(self.cost(body, fused), n)
            out.add(self.cost(ins.attrs.get("condition", "").lstrip("%"), fused), n + 1 if self.trip_counts else 1)
        elif op in ("call", "async-start") or (op.endswith("-start") and "calls" in ins.attrs):
            callee = ins.attrs.get("to_apply") or ins.attrs.get("calls")
            for c in _comp_names(callee):
                out.add(self.cost(c, fused))
        elif op == "conditional":
            names = _comp_names(ins.attrs.get("branch_computations"))
            names += [ins.attrs[k].lstrip("%") for k in ("true_computation", "false_computation") if k in ins.attrs]
            for c in names:
                out.add(self.cost(c, fused))
        # bytes
        if not fused:
            b, bl = self.bytes_of(ins, comp)
            out.bytes += b
            out.bytes_logical += bl
        return out

    # -- bytes of one top-level instruction: (tiled, logical)
    def bytes_of(self, ins: Instruction, comp: Computation) -> tuple[float, float]:
        op = ins.opcode
        if op in _NO_BYTES or op.endswith("-update") or (op.endswith("-start") and "calls" in ins.attrs) \
                or (op.endswith("-done") and op not in ("copy-done",) and _is_async_wrapper_done(ins, comp)):
            return 0.0, 0.0

        def size(name_or_type: str, tiled: bool, is_type: bool = False) -> float:
            if is_type:
                return type_bytes(name_or_type, tiled)
            src = comp.by_name.get(name_or_type)
            return type_bytes(src.type, tiled) if src else 0.0

        def total(tiled: bool) -> float:
            ops = ins.operands
            if op == "copy-start":
                return 2 * size(ops[0], tiled)
            if op == "copy-done":
                return 0.0
            if op.endswith("-start"):  # collective: its operands (its -done counts the result)
                return sum(size(o, tiled) for o in ops)
            if op.endswith("-done"):
                return size(ins.type, tiled, True)
            if op in ("slice", "dynamic-slice"):
                return 2 * size(ins.type, tiled, True) + sum(size(o, tiled) for o in ops[1:])
            if op == "gather":
                return 2 * size(ins.type, tiled, True) + size(ops[1], tiled)
            if op == "dynamic-update-slice":
                return 2 * size(ops[1], tiled) + sum(size(o, tiled) for o in ops[2:])
            if op == "scatter":
                k = (len(ops) - 1) // 2
                upd = sum(size(o, tiled) for o in ops[k + 1:])
                return 3 * upd + size(ops[k], tiled)
            if op == "fusion":
                return self.fusion_bytes(ins, comp, tiled)
            return size(ins.type, tiled, True) + sum(size(o, tiled) for o in ops)

        return total(True), total(False)

    def fusion_bytes(self, ins: Instruction, comp: Computation, tiled: bool) -> float:
        fc = self.comps.get(ins.attrs.get("calls", "").lstrip("%"))
        if fc is None:
            return type_bytes(ins.type, tiled) + sum(type_bytes(comp.by_name[o].type, tiled) for o in ins.operands
                                                 if o in comp.by_name)
        # output: a dynamic-update-slice or scatter root (or tuple element) writes only its update
        root = fc.root
        outs = [fc.by_name.get(o) for o in root.operands] if root.opcode == "tuple" else [root]
        result = 0.0
        for o in outs:
            if o is None:
                continue
            if o.opcode in ("dynamic-update-slice", "scatter"):
                upd = fc.by_name.get(o.operands[1] if o.opcode == "dynamic-update-slice" else o.operands[-1])
                result += type_bytes(upd.type, tiled) if upd else 0.0
            else:
                result += type_bytes(o.type, tiled)
        for i, name in enumerate(ins.operands):
            param = fc.parameter(i)
            if param is None:
                src = comp.by_name.get(name)
                result += type_bytes(src.type, tiled) if src else 0.0
            else:
                result += self.param_read(fc, param.name, tiled)
        return result

    def users(self, fc: Computation) -> dict[str, list[Instruction]]:
        if fc.name not in self.user_tables:
            table: dict[str, list[Instruction]] = {}
            for x in fc.instructions:
                for o in dict.fromkeys(x.operands):
                    table.setdefault(o, []).append(x)
            self.user_tables[fc.name] = table
        return self.user_tables[fc.name]

    def param_read(self, fc: Computation, name: str, tiled: bool) -> float:
        """Bytes a fused parameter reads, as HloCostAnalysis's FusionParameterReadBytes counts them:
        a slice or dynamic-slice user reads what it outputs (so does a gather here), a
        dynamic-update-slice reads nothing of the buffer it updates in place (a scatter reads the
        rows it updates), a nested fusion reads what its parameter reads, a broadcast or reshape
        reads the whole array, all other users share one whole read; a bitcast passes through."""
        key = (fc.name, name, tiled)
        if key in self.read_memo:
            return self.read_memo[key]
        src = fc.by_name.get(name)
        full = type_bytes(src.type, tiled) if src else 0.0
        size, trivial = 0.0, False
        for u in self.users(fc).get(name, []):
            op, first = u.opcode, bool(u.operands) and u.operands[0] == name
            if op == "fusion":
                nested = self.comps.get(u.attrs.get("calls", "").lstrip("%"))
                for idx, o in enumerate(u.operands):
                    p = nested.parameter(idx) if nested is not None and o == name else None
                    if p is not None:
                        size += self.param_read(nested, p.name, tiled)
            elif op == "slice" or (op in ("dynamic-slice", "gather") and first):
                size += type_bytes(u.type, tiled)
            elif op == "dynamic-update-slice" and first and u.operands.count(name) == 1:
                continue  # updated in place: the update's bytes count as the fusion's output
            elif op == "scatter" and first and u.operands.count(name) == 1:
                upd = fc.by_name.get(u.operands[-1])
                size += type_bytes(upd.type, tiled) if upd else 0.0
            elif op == "bitcast" and not u.root:
                through = self.param_read(fc, u.name, tiled)
                if through < full:
                    size += through
                elif not trivial:
                    trivial = True
                    size += full
            elif op in ("broadcast", "reshape"):
                size += full
            elif not trivial:
                trivial = True
                size += full
        self.read_memo[key] = size
        return size

    # -- trip counts
    def trip_count(self, ins: Instruction, comp: Computation) -> int | None:
        bc = ins.attrs.get("backend_config", "")
        m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', bc)
        if m:
            return int(m.group(1))
        cond = self.comps.get(ins.attrs.get("condition", "").lstrip("%"))
        body = self.comps.get(ins.attrs.get("body", "").lstrip("%"))
        if cond is None:
            return None
        cmp_ins, cmp_comp, env = cond.root, cond, {}
        if cmp_ins.opcode == "fusion":  # the compare fused: map its parameters to the fusion's operands
            fc = self.comps.get(cmp_ins.attrs.get("calls", "").lstrip("%"))
            if fc is None:
                return None
            env = {fc.parameter(i).name: (cond, o) for i, o in enumerate(cmp_ins.operands) if fc.parameter(i)}
            cmp_ins, cmp_comp = fc.root, fc
        if cmp_ins.opcode != "compare" or len(cmp_ins.operands) != 2:
            return None
        direction = ins_dir = cmp_ins.attrs.get("direction", "")
        a = _resolve(cmp_comp, cmp_ins.operands[0], env)
        b = _resolve(cmp_comp, cmp_ins.operands[1], env)
        if a is None or b is None:
            return None
        if b[0] == "elem" and a[0] != "elem":
            a, b = b, a
            direction = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}.get(ins_dir, ins_dir)
        if a[0] == b[0] == "elem" and body is not None and _step(self.comps, body, a[1]) is None \
                and _step(self.comps, body, b[1]) is not None:
            a, b = b, a
            direction = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}.get(ins_dir, ins_dir)
        init = _init_values(ins, comp)
        if a[0] != "elem":
            return None
        i = a[1]
        if b[0] == "elem":  # a loop-invariant bound: its initial value
            limit = init.get(b[1])
            if limit is None:
                return None
        else:
            limit = b[1]
        start = init.get(i, 0)
        step = _step(self.comps, body, i) if body is not None else 1
        if step is None:
            step = 1
        if direction in ("LT", "LE") and step > 0:
            span = limit - start + (1 if direction == "LE" else 0)
            return max(0, -(-span // step))
        if direction in ("GT", "GE") and step < 0:
            span = start - limit + (1 if direction == "GE" else 0)
            return max(0, -(-span // -step))
        return None


def _cost_estimate(backend_config: str) -> dict | None:
    """The `cost_estimate` a Pallas TPU kernel's backend_config carries (jax's tpu_custom_call), if any."""
    backend_config = backend_config.replace('\\"', '"')
    m = re.search(r'"cost_estimate"\s*:\s*(\{[^{}]*\})', backend_config)
    if not m:
        return None
    try:
        return {k: float(v) for k, v in json.loads(m.group(1)).items()}
    except (ValueError, TypeError):
        return None


def _is_async_wrapper_done(ins: Instruction, comp: Computation) -> bool:
    """An async-done whose start wraps a computation (its bytes count inside the wrapper)."""
    if ins.opcode == "async-done":
        return True
    start = comp.by_name.get(ins.operands[0]) if ins.operands else None
    return start is not None and "calls" in start.attrs


def _constant(ins: Instruction) -> int | None:
    text = ins.operands[0].strip() if ins.operands else ""
    return int(text) if re.fullmatch(r"-?\d+", text) else None


def _resolve(comp: Computation, name: str, env: dict, depth: int = 0):
    """("const", v) or ("elem", tuple index of the loop state) for a scalar in a loop condition."""
    ins = comp.by_name.get(name)
    if ins is None or depth > 20:
        return None
    if ins.opcode == "constant":
        v = _constant(ins)
        return ("const", v) if v is not None else None
    if ins.opcode in ("copy", "convert", "bitcast", "reshape", "broadcast") and ins.operands:
        return _resolve(comp, ins.operands[0], env, depth + 1)
    if ins.opcode == "parameter" and ins.name in env:
        outer, operand = env[ins.name]
        return _resolve(outer, operand, {}, depth + 1)
    if ins.opcode == "get-tuple-element":
        src = comp.by_name.get(ins.operands[0])
        if src is not None and src.opcode == "parameter":
            return ("elem", int(ins.attrs.get("index", -1)))
    return None


def _init_values(w: Instruction, comp: Computation) -> dict[int, int]:
    """Constant elements of a while's init tuple."""
    init = comp.by_name.get(w.operands[0]) if w.operands else None
    out = {}
    if init is None or init.opcode != "tuple":
        return out
    for i, o in enumerate(init.operands):
        r = _resolve(comp, o, {})
        if r and r[0] == "const":
            out[i] = r[1]
    return out


def _step(comps: dict[str, Computation], body: Computation, i: int) -> int | None:
    """The constant the body adds to loop-state element i (None when it is not `add(elem i, c)`,
    directly or fused)."""
    root = body.root
    if root.opcode != "tuple" or i >= len(root.operands):
        return None
    ins, where, env = body.by_name.get(root.operands[i]), body, {}
    if ins is not None and ins.opcode == "fusion":  # the increment fused (CPU: wrapped_add)
        fc = comps.get(ins.attrs.get("calls", "").lstrip("%"))
        if fc is None:
            return None
        env = {fc.parameter(k).name: (body, o) for k, o in enumerate(ins.operands) if fc.parameter(k)}
        ins, where = fc.root, fc
    if ins is None or ins.opcode not in ("add", "subtract") or len(ins.operands) != 2:
        return None
    a, b = (_resolve(where, o, env) for o in ins.operands)
    return _combine(ins.opcode, a, b, i)


def _combine(opcode: str, a, b, i: int) -> int | None:
    if a == ("elem", i) and b and b[0] == "const":
        return b[1] if opcode == "add" else -b[1]
    if opcode == "add" and b == ("elem", i) and a and a[0] == "const":
        return a[1]
    return None


def program_cost(hlo_text: str, *, trip_counts: bool = True) -> dict:
    """FLOPs, transcendentals and bytes accessed of one execution of the optimized HLO module in
    `hlo_text` (`compiled.as_text()`), every computation counted as many times as it runs (see the
    module docstring). Returns {"flops", "matmul_flops" (the dot and convolution part of "flops"),
    "custom_call_flops" (the part of "flops" from custom calls' cost estimates),
    "transcendentals", "bytes_accessed", "bytes_accessed_logical",
    "loops": [(body name, trip count or None)], "unknown_trip_counts", "custom_calls": [{"name",
    "target"[, "cost_estimate"]}]}. For an SPMD program these are one device's numbers.

    `trip_counts=False` counts every loop body and condition once, as HloCostAnalysis does: the same
    program then gives `compiled.cost_analysis()`'s FLOPs, which is how this walker is checked."""
    comps = parse_module(hlo_text)
    entry = next((c for c in comps.values() if c.entry), None)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    w = _Walker(comps, trip_counts)
    c = w.cost(entry.name, False)
    return {"flops": c.flops, "matmul_flops": c.matmul_flops, "custom_call_flops": c.custom_call_flops,
            "transcendentals": c.transcendentals, "bytes_accessed": c.bytes, "bytes_accessed_logical": c.bytes_logical,
            "loops": w.loops, "unknown_trip_counts": w.unknown, "custom_calls": w.custom_calls}
