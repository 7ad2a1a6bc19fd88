"""Check that an ONNX file's integers stay within int32 at the largest inputs its manifest allows.

OpenVINO's CPU plugin computes int64 arithmetic in int32, and TensorRT before 10 has no INT64
type: an integer that passes 2^31 is a silently wrong answer there (serving-runtimes.md). So the
export runs the file's integer arithmetic on the profile's extreme calls (the largest N as one
long strip, as one square image and as a video of small slices; the most images) and refuses the
file when an integer tensor can leave int32.

Running the whole file at N = 65536 is out of reach (its attention is N^2), and bounding
everything by intervals cannot follow the grid arithmetic (t * h * w is at most N, but t, h and w
are each up to N on their own). The check mixes the two, node by node:

- what follows from the inputs' integers and the tensors' shapes (positions, segment ids,
  window ids, sizes, every Reshape's target) is computed exactly, with ONNX's reference
  implementation of each operator; every tensor's shape is known, from the exporter's symbolic
  sizes evaluated at the call's own sizes;
- what depends on features (scores, kept indices, neighbours) or would be too large to compute
  (masks of N x N) is bounded by intervals: an index by the axis it indexes, a count by the
  length it counts over, a gather by its data, a comparison by {0, 1}.

An integer tensor whose values or bound pass int32, or that cannot be bounded, is a finding.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import sympy
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

INT32_MAX = 2 ** 31 - 1
COMPUTED_LIMIT = 1 << 25
"""Largest tensor (elements) computed exactly (N x S comparisons at the most images: 1.7e7); larger ones
are bounded (an N x N mask is 4.3e9 at N = 65536)."""
INTEGER_TYPES = {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT8,
                 TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64}
Bound = tuple[float, float]
UNBOUNDED: Bound = (-math.inf, math.inf)
BOOLEAN: Bound = (0.0, 1.0)


@dataclass
class Bounded:
    """A tensor known only by the range of its elements, and its shape where known."""

    bound: Bound
    shape: tuple[int | None, ...] | None = None
    integer: bool = False
    exact: bool = True  # False: each size is only an upper bound (a Range to a bounded limit)


Value = np.ndarray | Bounded


@dataclass(frozen=True)
class Finding:
    node: str
    op_type: str
    output: str
    bound: Bound
    call: str

    def __str__(self) -> str:
        low, high = self.bound
        if math.isinf(low) or math.isinf(high):
            return f"{self.op_type} {self.node!r}: its integer output {self.output!r} cannot be bounded ({self.call})"
        return (f"{self.op_type} {self.node!r}: integer output {self.output!r} reaches [{low:.0f}, {high:.0f}], "
                f"outside int32 ({self.call})")


@dataclass
class Int32Report:
    """The calls the check ran, the widest integer it met (and where), and the findings."""

    calls: list[str]
    widest: int = 0
    widest_at: str = ""
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        if self.ok:
            return (f"integers within int32 at the largest inputs ({', '.join(self.calls)}): the widest reaches "
                    f"{self.widest:,}")
        return f"an integer can leave int32: {self.findings[0]}" + \
            (f" (and {len(self.findings) - 1} more)" if len(self.findings) > 1 else "")

    def as_dict(self) -> dict:
        return {"ok": self.ok, "int32_max": INT32_MAX, "calls": self.calls, "largest_integer": self.widest,
                "largest_at": self.widest_at, "findings": [str(f) for f in self.findings]}


def check_int32(path: str | Path, calls: Mapping[str, Mapping[str, np.ndarray | Bounded]]) -> Int32Report:
    """Run the integer arithmetic of the ONNX file at `path` on each named call (a layout's `extreme_calls`).
    A call gives each input its values (an array) or only their range and shape (features: never
    computed). Floating weights stored as external data are not read."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    report = Int32Report(list(calls))
    evaluators: dict[int, tuple[onnx.NodeProto, ReferenceEvaluator]] = {}  # per node, for every call of this check
    for name, inputs in calls.items():
        _Run(model, inputs, name, report, path.parent, evaluators).walk(model.graph, {})
    return report


def _initializer(tensor: onnx.TensorProto, folder: Path) -> Value:
    """A weight's values; for floating weights kept as external data, only their shape."""
    external = tensor.data_location == TensorProto.EXTERNAL
    if external and tensor.data_type not in INTEGER_TYPES:
        return Bounded(UNBOUNDED, tuple(tensor.dims))
    return numpy_helper.to_array(tensor, str(folder) if external else "")


class _Run:
    """One call through the graph: the symbol values it fixes and the values met so far."""

    def __init__(self, model: onnx.ModelProto, inputs: Mapping[str, np.ndarray | Bounded], call: str,
                 report: Int32Report, folder: Path,
                 evaluators: dict[int, tuple[onnx.NodeProto, ReferenceEvaluator]]) -> None:
        self.call, self.report, self.folder, self.evaluators = call, report, folder, evaluators
        self.inputs = dict(inputs)
        shapes = {name: value.shape for name, value in self.inputs.items()}
        self.symbols = _solve_symbols(model.graph, shapes)
        self.opsets = {opset.domain: opset.version for opset in model.opset_import}

    def walk(self, graph: onnx.GraphProto, outer: Mapping[str, Value]) -> dict[str, Value]:
        values: dict[str, Value] = dict(outer)
        for graph_input in graph.input:
            if graph_input.name in self.inputs:
                values[graph_input.name] = self.inputs[graph_input.name]
        for initializer in graph.initializer:
            values[initializer.name] = _initializer(initializer, self.folder)
        declared = {info.name: info for info in [*graph.value_info, *graph.output]}
        for node in graph.node:
            inputs = [values.get(name) if name else None for name in node.input]
            shapes = [self._shape(declared.get(name)) for name in node.output]
            for name, value in zip(node.output, self._node(node, inputs, shapes, values)):
                if not name:
                    continue
                values[name] = value
                info = declared.get(name)
                self._learn_sizes(info, _shape_of(value))
                if isinstance(value, Bounded) and info is not None and info.type.tensor_type.elem_type:
                    value.integer = info.type.tensor_type.elem_type in INTEGER_TYPES
                integer = value.dtype.kind in "iu" if isinstance(value, np.ndarray) else value.integer
                if integer:
                    self._record(node, name, value)
        return values

    def _learn_sizes(self, info: onnx.ValueInfoProto | None, shape: tuple[int, ...] | None) -> None:
        """Fix the value of a size symbol that no input fixes (a data-dependent size, `u26`) from
        the first tensor that has it, so that later shapes naming it are known."""
        if info is None or shape is None or not info.type.tensor_type.HasField("shape"):
            return
        dims = info.type.tensor_type.shape.dim
        if len(dims) == len(shape):
            for dim, size in zip(dims, shape):
                if size is not None and dim.dim_param.isidentifier() and dim.dim_param not in self.symbols:
                    self.symbols[dim.dim_param] = int(size)

    def _shape(self, info: onnx.ValueInfoProto | None) -> tuple[int | None, ...] | None:
        """A declared shape at this call's sizes; None for an unknown rank, None entries for sizes
        that name a symbol nothing has fixed yet."""
        if info is None or not info.type.tensor_type.HasField("shape"):
            return None
        return tuple(dim.dim_value if dim.HasField("dim_value") else
                     _evaluate(dim.dim_param, self.symbols) if dim.dim_param else None
                     for dim in info.type.tensor_type.shape.dim)

    def _record(self, node: onnx.NodeProto, name: str, value: Value) -> None:
        if isinstance(value, np.ndarray):
            low, high = (float(value.min()), float(value.max())) if value.size else (0.0, 0.0)
        else:
            low, high = value.bound
        widest = max(abs(low), abs(high))
        if widest > INT32_MAX:
            self.report.findings.append(Finding(node.name, node.op_type, name, (low, high), self.call))
        elif widest > self.report.widest:
            self.report.widest, self.report.widest_at = int(widest), f"{node.op_type} {node.name!r} ({self.call})"

    def _node(self, node: onnx.NodeProto, inputs: list[Value | None], shapes: list[tuple[int, ...] | None],
              values: Mapping[str, Value]) -> list[Value]:
        if node.op_type == "If":
            return self._if(node, inputs[0], values)
        if node.op_type == "Loop":
            return self._loop(node, inputs, values)
        if node.op_type in ("Shape", "Size") and _complete(_shape_of(inputs[0])) and _exact(inputs[0]):
            shape = np.array(_shape_of(inputs[0]), dtype=np.int64)
            if node.op_type == "Size":
                return [np.array(shape.prod(), dtype=np.int64)]
            start, end = _attribute(node, "start", 0), _attribute(node, "end")
            return [shape[start:end]]
        present = [v for v in inputs if v is not None]
        small = all(_complete(shape) and math.prod(shape) <= COMPUTED_LIMIT for shape in shapes) or \
            (not all(map(_complete, shapes)) and sum(v.size for v in present if isinstance(v, np.ndarray)) <= COMPUTED_LIMIT)
        if all(isinstance(v, np.ndarray) for v in present) and small and _creates_at_most(node, inputs, COMPUTED_LIMIT) \
                and node.domain in ("", "ai.onnx"):
            feeds = {name: value for name, value in zip(node.input, inputs) if name}
            return list(self._evaluator(node).run(None, feeds))
        exact = True
        if not all(map(_complete, shapes)) and node.op_type in ELEMENTWISE:
            shapes, exact = [_broadcast([_shape_of(v) for v in present])], all(map(_exact, present))
        if not all(map(_complete, shapes)) and node.op_type == "Concat" and all(_complete(_shape_of(v)) for v in present):
            axis = _attribute(node, "axis") % len(_shape_of(present[0]))
            joined = list(_shape_of(present[0]))
            joined[axis] = sum(_shape_of(v)[axis] for v in present)
            shapes, exact = [tuple(joined)], all(map(_exact, present))
        if not all(map(_complete, shapes)) and node.op_type in REDUCTIONS and _complete(_shape_of(inputs[0])):
            shapes, exact = [_reduced_shape(node, inputs)], _exact(inputs[0])
        if not all(map(_complete, shapes)) and node.op_type in RESHAPES and isinstance(inputs[0], Bounded) \
                and _complete(inputs[0].shape) and all(isinstance(v, np.ndarray) for v in present[1:]):
            shapes, exact = [self._moved_shape(node, inputs)], inputs[0].exact
        return _bounded(node, inputs, shapes, exact)

    def _moved_shape(self, node: onnx.NodeProto, inputs: list[Value | None]) -> tuple[int, ...]:
        """The output shape of a view-like operator on a tensor known only by its shape: the operator
        run on a zero-strided stand-in of that shape (no memory)."""
        stand_in = np.broadcast_to(np.zeros((), dtype=np.float32), inputs[0].shape)
        feeds = {name: stand_in if index == 0 else value
                 for index, (name, value) in enumerate(zip(node.input, inputs)) if name}
        return tuple(self._evaluator(node).run(None, feeds)[0].shape)

    def _evaluator(self, node: onnx.NodeProto) -> ReferenceEvaluator:
        """ONNX's reference implementation of `node`, built once per node for every call. The entry
        holds the node itself, so that its id is not reused by another node while the check runs."""
        held = self.evaluators.get(id(node))
        if held is None or held[0] is not node:
            held = self.evaluators[id(node)] = node, ReferenceEvaluator(node, opsets={"": self.opsets.get("", 18)})
        return held[1]

    def _if(self, node: onnx.NodeProto, condition: Value | None, values: Mapping[str, Value]) -> list[Value]:
        branches = [_attribute(node, "then_branch"), _attribute(node, "else_branch")]
        if isinstance(condition, np.ndarray):
            branches = branches[:1] if bool(condition) else branches[1:]
        results = []
        for branch in branches:
            scope = self.walk(branch, values)
            results.append([scope.get(output.name, Bounded(UNBOUNDED)) for output in branch.output])
        if len(results) == 1:
            return results[0]
        return [Bounded(_union(_range(a), _range(b)), _shape_of(a) if _shape_of(a) == _shape_of(b) else None,
                        _is_integer(a) or _is_integer(b)) for a, b in zip(*results)]

    def _loop(self, node: onnx.NodeProto, inputs: list[Value | None], values: Mapping[str, Value]) -> list[Value]:
        """A Loop is bounded, not run: its body once, with the iteration number in [0, trip count)
        and each carried value at its initial range. A carried value that leaves that range is
        unbounded; scan outputs keep the body's range."""
        body = _attribute(node, "body")
        trips = _range(inputs[0])[1] if inputs and inputs[0] is not None else math.inf
        carried = [v if v is not None else Bounded(UNBOUNDED) for v in inputs[2:]]
        scope = dict(values)
        scope[body.input[0].name] = Bounded((0.0, max(trips - 1, 0.0)), (), True)
        scope[body.input[1].name] = Bounded(BOOLEAN, (), False)
        for info, value in zip(body.input[2:], carried):
            scope[info.name] = Bounded(_range(value), None, _is_integer(value))
        results = self.walk(body, scope)
        outputs = [results.get(output.name, Bounded(UNBOUNDED)) for output in body.output[1:]]
        bounded = []
        for index, value in enumerate(outputs):
            if index < len(carried):
                start, end = _range(carried[index]), _range(value)
                stays = start[0] <= end[0] and end[1] <= start[1]
                bounded.append(Bounded(start if stays else UNBOUNDED, None, _is_integer(carried[index])))
            else:
                bounded.append(Bounded(_range(value), None, _is_integer(value)))
        return bounded


def _solve_symbols(graph: onnx.GraphProto, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Each size symbol's value in this call, from the inputs whose dimension is `c * symbol`."""
    symbols: dict[str, int] = {}
    for graph_input in graph.input:
        for dim, size in zip(graph_input.type.tensor_type.shape.dim, shapes.get(graph_input.name, ())):
            if dim.dim_param:
                coefficient, rest = _parse(dim.dim_param).as_coeff_Mul()
                if isinstance(rest, sympy.Symbol) and coefficient > 0:
                    symbols[rest.name] = int(size // coefficient)
    return symbols


SIZE_FUNCTIONS = {"Max", "Min", "floor", "ceiling", "Mod", "Abs"}
"""Functions the exporter writes in symbolic sizes (`Max(0, s30*s68 - ...)`)."""


@lru_cache(maxsize=None)
def _parse(text: str) -> sympy.Expr:
    """A symbolic size as an expression, every name in it a symbol (`S`, `N` and `E` included,
    which sympy would otherwise read as its own objects)."""
    names = {name: sympy.Symbol(name) for name in re.findall(r"[A-Za-z_]\w*", text) if name not in SIZE_FUNCTIONS}
    return sympy.parse_expr(text, local_dict=names)


def _evaluate(text: str, symbols: Mapping[str, int]) -> int | None:
    """A symbolic size at this call's symbol values; None when it names a size no input fixes."""
    try:
        expression = _parse(text)
    except (sympy.SympifyError, TypeError, SyntaxError):
        return None
    if any(symbol.name not in symbols for symbol in expression.free_symbols):
        return None
    return int(expression.subs({sympy.Symbol(name): value for name, value in symbols.items()}))


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _range(value: Value | None) -> Bound:
    if value is None:
        return UNBOUNDED
    if isinstance(value, Bounded):
        return value.bound
    if not value.size:
        return (0.0, 0.0)
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        return UNBOUNDED
    return float(value.min()), float(value.max())


def _shape_of(value: Value | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    return tuple(value.shape) if isinstance(value, np.ndarray) else value.shape


def _creates_at_most(node: onnx.NodeProto, inputs: list[Value | None], limit: int) -> bool:
    """Whether an operator that makes a tensor from sizes (not from its data) makes at most `limit`
    elements; True for every other operator."""
    op = node.op_type
    if op == "ConstantOfShape":
        return math.prod(int(d) for d in inputs[0].ravel()) <= limit
    if op == "Expand":
        return math.prod(np.broadcast_shapes(inputs[0].shape, tuple(int(d) for d in inputs[1].ravel()))) <= limit
    if op == "Tile":
        return inputs[0].size * math.prod(int(r) for r in inputs[1].ravel()) <= limit
    if op == "Range":
        start, end, step = (float(v) for v in inputs[:3])
        return step != 0 and (end - start) / step <= limit
    return True


def _broadcast(shapes: list[tuple[int | None, ...] | None]) -> tuple[int, ...] | None:
    """The shape elementwise inputs broadcast to; None unless every input's shape is known."""
    if not all(map(_complete, shapes)):
        return None
    return tuple(np.broadcast_shapes(*shapes))


def _exact(value: Value | None) -> bool:
    return not isinstance(value, Bounded) or value.exact


def _complete(shape: tuple[int | None, ...] | None) -> bool:
    return shape is not None and None not in shape


def _axis_length(value: Value | None, axis: int) -> float:
    """The length of one axis (an index along it is below this); inf when unknown."""
    shape = _shape_of(value)
    if shape is None or shape[axis] is None:
        return math.inf
    return float(shape[axis])


def _longest(shape: tuple[int | None, ...] | None) -> float:
    """The longest axis of a shape (an index into it is below this); inf when unknown."""
    if shape is None or None in shape:
        return math.inf
    return float(max(shape, default=1))


def _is_integer(value: Value | None) -> bool:
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "iu"
    return value is not None and value.integer


def _union(*bounds: Bound) -> Bound:
    return min(b[0] for b in bounds), max(b[1] for b in bounds)


def _product(a: Bound, b: Bound) -> Bound:
    corners = [0.0 if x == 0 or y == 0 else x * y for x in a for y in b]
    return min(corners), max(corners)


def _divide(a: Bound, b: Bound) -> Bound:
    if b[0] > 0 or b[1] < 0:
        corners = [x / y for x in a for y in b if not (math.isinf(x) and math.isinf(y))]
        if len(corners) == 4:
            return min(corners), max(corners)
    return UNBOUNDED


def _floor(a: Bound) -> Bound:
    return tuple(math.floor(x) if math.isfinite(x) else x for x in a)


def _magnitude(a: Bound) -> Bound:
    return (0.0 if a[0] <= 0 <= a[1] else min(abs(a[0]), abs(a[1]))), max(abs(a[0]), abs(a[1]))


ARITHMETIC = {
    "Add": lambda a, b: (a[0] + b[0], a[1] + b[1]), "Sub": lambda a, b: (a[0] - b[1], a[1] - b[0]),
    "Mul": _product, "Div": _divide,
    "Min": lambda *b: (min(x[0] for x in b), min(x[1] for x in b)),
    "Max": lambda *b: (max(x[0] for x in b), max(x[1] for x in b)),
    "Neg": lambda a: (-a[1], -a[0]), "Abs": _magnitude, "Sign": lambda a: (-1.0, 1.0),
    "Floor": _floor, "Ceil": lambda a: tuple(math.ceil(x) if math.isfinite(x) else x for x in a),
    "Round": lambda a: (a[0] - 0.5, a[1] + 0.5), "Identity": lambda a: a, "Relu": lambda a: (max(a[0], 0.0), max(a[1], 0.0)),
    "Clip": lambda a, low=UNBOUNDED, high=UNBOUNDED: (max(a[0], low[0]), min(a[1], high[1])),
    "Mod": lambda a, b: (-_magnitude(b)[1], _magnitude(b)[1]) if math.isfinite(_magnitude(b)[1]) else _magnitude(a),
}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Min", "Max", "Neg", "Abs", "Sign", "Floor", "Ceil", "Mod", "Cast",
               "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Where"}
REDUCTIONS = {"ReduceSum", "ReduceMax", "ReduceMin", "CumSum"}
RESHAPES = {"Slice", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Flatten"}
"""Operators whose output shape follows from their data's shape and their other (known) inputs."""
COMPARISONS = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf"}
SELECTS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Expand", "Tile", "Gather", "GatherElements",
           "GatherND", "Slice", "Split", "ReduceMax", "ReduceMin", "Pad", "DepthToSpace", "SpaceToDepth",
           "Compress", "Trilu", "Concat", "Where", "ScatterElements", "ScatterND"}


def _bounded(node: onnx.NodeProto, inputs: list[Value | None], shapes: list[tuple[int | None, ...] | None],
             exact: bool = True) -> list[Value]:
    """Interval bounds of a node's outputs: what values it can produce from its inputs' ranges."""
    op, ranges = node.op_type, [_range(v) for v in inputs]
    first = inputs[0] if inputs else None
    data_input = inputs[1] if op == "Where" and len(inputs) > 1 else first
    integer = _is_integer(data_input)  # the type of the data an operator moves or combines

    def out(bound: Bound, index: int = 0, is_integer: bool = integer) -> Bounded:
        return Bounded(bound, shapes[index] if index < len(shapes) else None, is_integer, exact)

    if op == "Shape":
        return [out((0.0, _longest(_shape_of(first))), is_integer=True)]
    if op == "Size":
        shape = _shape_of(first)
        return [out((0.0, math.prod(shape) if _complete(shape) else math.inf), is_integer=True)]
    if op in COMPARISONS:
        return [out(BOOLEAN, is_integer=False)]
    if op == "Cast":
        to = _attribute(node, "to")
        if to == TensorProto.BOOL:
            return [out(BOOLEAN, is_integer=False)]
        if to not in INTEGER_TYPES:
            return [out(ranges[0], is_integer=False)]
        low, high = ranges[0]  # truncation toward zero stays within floor(low), ceil(high)
        return [out((math.floor(low) if math.isfinite(low) else low, math.ceil(high) if math.isfinite(high) else high),
                    is_integer=True)]
    if op in ARITHMETIC:  # an input not known (or an omitted Clip bound) counts as unbounded
        return [out(ARITHMETIC[op](*ranges))]
    if op in SELECTS:
        data = [r for r, n in zip(ranges, node.input) if n]
        if op == "Where":
            data = data[1:]
        elif op in ("ScatterElements", "ScatterND"):
            data = [data[0], data[2]]
        elif op == "Pad":
            data = [data[0], data[2] if len(data) > 2 else (0.0, 0.0)]
        elif op != "Concat":
            data = data[:1]
        return [out(_union(*data), index) for index in range(len(node.output))]
    if op in ("ReduceSum", "CumSum"):
        count = _summed_length(node, inputs)
        low, high = ranges[0]
        return [out((min(low, 0.0) * count if low else 0.0, max(high, 0.0) * count if high else 0.0))]
    if op in ("ArgMax", "ArgMin"):
        return [out((0.0, _axis_length(first, _attribute(node, "axis", 0)) - 1), is_integer=True)]
    if op == "NonZero":
        return [out((0.0, _longest(_shape_of(first)) - 1), is_integer=True)]
    if op == "TopK":
        return [out(ranges[0], 0), out((0.0, _axis_length(first, _attribute(node, "axis", -1)) - 1), 1, True)]
    if op == "Range":
        if not _complete(shapes[0]) and isinstance(inputs[2], np.ndarray) and float(inputs[2]) != 0:
            longest = math.ceil(max(abs(ranges[1][1] - ranges[0][0]), abs(ranges[1][0] - ranges[0][1])) / abs(float(inputs[2])))
            if math.isfinite(longest):
                return [Bounded(_union(ranges[0], ranges[1]), (int(longest),), integer, False)]
        return [out(_union(ranges[0], ranges[1]))]
    if op == "ConstantOfShape":
        value = _attribute(node, "value")
        fill = numpy_helper.to_array(value).ravel() if value is not None else np.zeros(1, np.float32)
        return [out((float(fill[0]), float(fill[0])), is_integer=fill.dtype.kind in "iu")]
    return [out(UNBOUNDED, index) for index in range(len(node.output))]  # an operator this module does not know


def _reduced_shape(node: onnx.NodeProto, inputs: list[Value | None]) -> tuple[int, ...] | None:
    """The output shape of a reduction (a CumSum keeps its input's) from the input's shape."""
    shape = _shape_of(inputs[0])
    if node.op_type == "CumSum":
        return shape
    axes = _reduced_axes(node, inputs, len(shape))
    if axes is None:
        return None
    if _attribute(node, "keepdims", 1):
        return tuple(1 if axis in axes else size for axis, size in enumerate(shape))
    return tuple(size for axis, size in enumerate(shape) if axis not in axes)


def _reduced_axes(node: onnx.NodeProto, inputs: list[Value | None], rank: int) -> list[int] | None:
    """The axes a reduction runs over (all when none are given), None when they are not known."""
    axes = inputs[1] if len(inputs) > 1 else _attribute(node, "axes")
    if axes is None or (isinstance(axes, np.ndarray) and not axes.size):
        return [] if _attribute(node, "noop_with_empty_axes", 0) else list(range(rank))
    if isinstance(axes, Bounded):
        return None
    return [int(a) % rank for a in np.ravel(axes)]


def _summed_length(node: onnx.NodeProto, inputs: list[Value | None]) -> float:
    """How many elements one output element of a ReduceSum or CumSum adds up (inf if unknown)."""
    shape = _shape_of(inputs[0])
    if shape is None:
        return math.inf
    axes = _reduced_axes(node, inputs, len(shape))
    sizes = [shape[a] for a in axes] if axes is not None else [None]
    return math.inf if None in sizes else float(math.prod(sizes))
