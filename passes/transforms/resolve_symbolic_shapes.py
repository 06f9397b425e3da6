"""Symbolic axes: analyse at representative sizes, keep the model's dynamic axes.

Exporters with a symbolic batch or sequence (the legacy TorchScript exporter above all) compute shapes at
run time: a ViT's class token is `Expand(cls, Where(Equal(Concat(Gather(Shape(x), 0), -1, -1), -1), ...))`,
an attention's head split reshapes to `Concat(b, n, 3, h, Div(Gather(Shape(x), 2), h))`. onnx's shape
inference gives up on such chains, so values lose their channel sizes and the channel analysis stops
("cannot resolve a channel dimension").

`specialise_shapes` makes a copy with every input's shape fixed and folds all of that arithmetic
(onnxscript's folder, with shape inference, nothing exempt). Pruning that copy and then trying to undo the
specialisation (putting symbolic axes back and guessing which folded constants meant "the batch") is
fragile: with batch 1, a 1 in a folded target may be the batch or a broadcast axis. So
`ResolveSymbolicShapes` never prunes a specialised copy. It specialises *two* copies, at the
representative sizes and at twice them, and compares them, then annotates the *original* graph:

- a value's axis whose size is the same in both copies is static (a channel count): it gets that size;
  an axis whose size changed keeps a symbolic dim, named after the input axis it equals in both copies
  (so the sequence axis stays one name through the graph, which token pruning relies on);
- a small integer or float tensor computed at run time that is equal in both copies (a head dim
  `C // h`, a scale `d ** -0.5`) becomes a constant: it encodes channel counts, and pruning must see and
  rewrite it (or keep the dense model's value) rather than recompute it from pruned shapes;
- a Reshape target computed at run time becomes a constant: static entries stay, an entry equal to the
  reshaped input's own size at that position in both copies becomes 0 ("copy it"), and at most one other
  size-dependent entry becomes -1 (what `static_reshape_targets.py` does for targets it can prove from
  the graph, here for any arithmetic, by evaluation).

Everything else that depends on the sizes (an Expand to the batch, a Range over the length) stays the
graph's own run-time computation, so the pruned model still runs at any batch and length. The sizes are
batch 1 and `length` for other symbolic axes, or the user's `input_shapes` (`--input-shape`).

Sizes the model cannot run at fold to nonsense: a BERT whose position table has 32 rows, specialised at
128 tokens, slices 32 rows at both sizes, so the slice looks static and its Expand target is frozen at 32.
So the pass runs the model in onnxruntime at both sizes first and halves the length until it runs at both
(the table bounds it); and it checks its result: the resolved graph must give the original's outputs at
sizes between the two copies', where nothing was folded. When either check fails the model is left as
it is (no error): the analysis then sees what onnx's inference alone gives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from pcc.passes.analysis.shapes import needs_specialising, representative_shapes, specialise_shapes

__all__ = ["ResolveSymbolicShapes"]

_SMALL = 64  # run-time tensors up to this many elements are shape arithmetic worth freezing
_SHORTEST = 4  # the length is halved down to this while the model does not run at it

Sizes = dict[str, list[int]]


def _values(model: ir.Model) -> dict[str, ir.Value]:
    found = {v.name: v for v in model.graph.initializers.values()}
    found.update((v.name, v) for node in model.graph for v in node.outputs if v.name)
    return found


def _static_dims(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None or not all(isinstance(d, int) for d in value.shape):
        return None
    return list(value.shape)


def _const(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


@dataclass
class _Copies:
    """The model at two sets of sizes (the second twice the first on every symbolic axis)."""

    first: dict[str, ir.Value]
    second: dict[str, ir.Value]
    symbols: dict[tuple[int, int], ir.SymbolicDim | None]  # (size in first, size in second) -> the input's dim

    def pair(self, name: str) -> tuple[ir.Value | None, ir.Value | None]:
        return self.first.get(name), self.second.get(name)

    def dims(self, name: str) -> list[int | ir.SymbolicDim | None] | None:
        """The value's shape: static sizes where both copies agree, else the matching input symbol (or None)."""
        a, b = (_static_dims(v) for v in self.pair(name))
        if a is None or b is None or len(a) != len(b):
            return None
        return [x if x == y else self.symbols.get((x, y)) for x, y in zip(a, b)]


@dataclass
class ResolveSymbolicShapes(ir.passes.InPlacePass):
    """Transform: static channel sizes, constant shape arithmetic and constant Reshape targets for a model
    with symbolic input axes, found by specialising two copies (the model keeps its dynamic axes)."""

    batch: int = 1
    length: int = 128
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not needs_specialising(model, self.input_shapes):
            return ir.passes.PassResult(model, False)
        original = ir.serde.serialize_model(model)
        runner = _Runner.of(original)
        sizes = None if runner is None else self._sizes_that_run(model, runner)
        if sizes is None:
            return ir.passes.PassResult(model, False)
        copies = _specialise(model, *sizes)
        trial = ir.serde.deserialize_model(original)
        if not _resolve(trial, copies) or not runner.agrees(trial, _between(*sizes)):
            return ir.passes.PassResult(model, False)
        _resolve(model, copies)
        return ir.passes.PassResult(model, True)

    def _sizes_that_run(self, model: ir.Model, runner: _Runner) -> tuple[Sizes, Sizes] | None:
        """The representative sizes and twice them, at a length the model runs at (halved from `length`)."""
        length, tried = self.length, None
        while length >= _SHORTEST:
            first = representative_shapes(model, self.batch, length, self.input_shapes)
            if first == tried:
                return None  # no axis follows the length: halving it changes nothing
            second = _doubled(model, first)
            if runner.runs(first) and runner.runs(second):
                return first, second
            length, tried = length // 2, first
        return None


def _doubled(model: ir.Model, sizes: Sizes) -> Sizes:
    """`sizes` with every symbolic axis twice as long (an input of undeclared shape is static at its sizes)."""
    doubled = {}
    for value in model.graph.inputs:
        dims = sizes[value.name]
        declared = value.shape if value.shape is not None else dims
        doubled[value.name] = [d if isinstance(s, int) else 2 * d for d, s in zip(dims, declared)]
    return doubled


def _between(first: Sizes, second: Sizes) -> Sizes:
    """Sizes strictly past the first copy's on every symbolic axis and at most the second's: where a value
    frozen because both copies agreed on it must still be right."""
    return {name: [a if a == b else a + max(1, (b - a) // 2) for a, b in zip(dims, second[name])]
            for name, dims in first.items()}


def _specialise(model: ir.Model, first: Sizes, second: Sizes) -> _Copies:
    symbols: dict[tuple[int, int], ir.SymbolicDim | None] = {}
    for value in model.graph.inputs:
        for symbol, a, b in zip(value.shape or (), first[value.name], second[value.name]):
            if not isinstance(symbol, int) and symbol.value is not None:
                known = symbols.setdefault((a, b), symbol)
                if known is not None and known.value != symbol.value:
                    symbols[(a, b)] = None  # two symbols at the same sizes: cannot tell them apart
    probe = _every_value_an_output(model)
    return _Copies(_values(specialise_shapes(probe, first)), _values(specialise_shapes(probe, second)), symbols)


def _every_value_an_output(model: ir.Model) -> ir.Model:
    """A copy whose every value is a graph output, so that folding keeps it (with its shape and value): a
    Slice of a position table that feeds a folded Gather would otherwise vanish from the specialised
    copies and keep the unknown shape onnx gave it, next to its consumer's resolved one."""
    probe = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    outputs = {id(v) for v in probe.graph.outputs}
    for node in probe.graph:
        for value in node.outputs:
            if value.name and id(value) not in outputs:
                probe.graph.outputs.append(value)
                outputs.add(id(value))
    return probe


def _resolve(model: ir.Model, copies: _Copies) -> bool:
    """Write what the copies agree on onto `model`: shapes, frozen shape arithmetic, size-free Reshape targets."""
    modified = _annotate_shapes(model, copies)
    modified |= _freeze_shape_arithmetic(model, copies)
    modified |= _constant_reshape_targets(model, copies)
    if modified:
        common_passes.RemoveUnusedNodesPass()(model)
    return modified


@dataclass
class _Runner:
    """The original model in onnxruntime, on random inputs of given sizes."""

    session: object  # onnxruntime.InferenceSession
    tolerance: float

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _Runner | None:
        """None where onnxruntime cannot load the model (then nothing can be checked, so nothing is resolved)."""
        from pcc.backends.onnx.runtime import session

        try:
            loaded = session(model.SerializeToString())
        except Exception:  # noqa: BLE001 - any load failure (an op onnxruntime lacks, a file over 2 GB) means: leave it
            return None
        types = {o.type.tensor_type.elem_type for o in model.graph.output}
        tolerance = 1e-2 if onnx.TensorProto.FLOAT16 in types else 1e-4
        return cls(loaded, tolerance)

    def outputs(self, sizes: Sizes, session=None) -> list[np.ndarray] | None:
        """The outputs at `sizes` on random inputs (seeded by the sizes), or None where the model fails."""
        import onnxruntime as ort

        from pcc.backends.onnx.runtime import random_inputs

        session = session or self.session
        options = ort.RunOptions()
        options.log_severity_level = 4  # a failure here only means "not these sizes": no error log
        feeds = random_inputs(session, seed=sum(map(sum, sizes.values())), shapes=sizes)
        try:
            return session.run(None, feeds, options)
        except Exception:  # noqa: BLE001 - onnxruntime raises its own exception types for a shape that does not fit
            return None

    def runs(self, sizes: Sizes) -> bool:
        return self.outputs(sizes) is not None

    def agrees(self, resolved: ir.Model, sizes: Sizes) -> bool:
        """Whether `resolved` gives the original's outputs at `sizes` (true where the original fails there)."""
        from pcc.backends.onnx.runtime import compare_outputs, session

        expected = self.outputs(sizes)
        if expected is None:
            return True
        try:
            other = session(ir.serde.serialize_model(resolved).SerializeToString())
        except Exception:  # noqa: BLE001 - a resolved graph onnxruntime refuses is a failed check
            return False
        actual = self.outputs(sizes, other)
        return actual is not None and compare_outputs(expected, actual).max_relative <= self.tolerance


def _annotate_shapes(model: ir.Model, copies: _Copies) -> bool:
    modified = False
    for node in model.graph:
        for value in node.outputs:
            dims = copies.dims(value.name)
            old = list(value.shape) if value.shape is not None else None
            if dims is None or (old is not None and len(old) != len(dims)):
                continue
            # a size-dependent axis no input symbol explains keeps the name it had, if any
            merged = [d if d is not None else (o if old is not None and not isinstance(o, int) else ir.SymbolicDim(None))
                      for d, o in zip(dims, old or [None] * len(dims))]
            if old is None or any(_differ(n, o) for n, o in zip(merged, old)):
                value.shape = ir.Shape(merged)
                if value.dtype is None:
                    value.dtype = copies.first[value.name].dtype
                modified = True
    return modified


def _freeze_shape_arithmetic(model: ir.Model, copies: _Copies) -> bool:
    """Small run-time tensors equal at both sizes (derived from static axes only) become initializers."""
    modified = False
    for node in list(model.graph):
        if node.op_type == "Shape":
            continue  # its consumers are frozen instead; a Shape's own output is dropped once unused
        for value in node.outputs:
            if value.const_value is not None or value.is_graph_output() or not value.uses():
                continue
            a, b = (_const(v) for v in copies.pair(value.name))
            if a is None or b is None or a.size > _SMALL or a.shape != b.shape or not np.array_equal(a, b):
                continue
            value.replace_all_uses_with(_initializer(model, f"{value.name}_static", a))
            modified = True
    return modified


def _constant_reshape_targets(model: ir.Model, copies: _Copies) -> bool:
    modified = False
    for node in list(model.graph):
        if node.op_type != "Reshape" or node.inputs[1].const_value is not None:
            continue
        allowzero = node.attributes.get("allowzero")
        if allowzero is not None and allowzero.value:
            continue
        targets = [_const(v) for v in copies.pair(node.inputs[1].name)]
        inputs = [_static_dims(v) for v in copies.pair(node.inputs[0].name)]
        if any(t is None for t in targets) or any(d is None for d in inputs):
            continue
        target = _size_free_target(targets[0], targets[1], inputs[0], inputs[1])
        if target is None:
            continue
        node.replace_input_with(1, _initializer(model, f"{node.name or 'reshape'}_static_target", target))
        _drop_stale_rank(node.outputs[0], target, node.inputs[0].shape)
        modified = True
    return modified


def _initializer(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    model.graph.register_initializer(value)
    return value


def _drop_stale_rank(output: ir.Value, target: np.ndarray, input_shape: ir.Shape | None) -> None:
    """An exporter's annotation of the other rank is wrong (ddddocr declares its CTC output `[1, seqlen]`,
    the Reshape makes `[T, 1, classes]`): once the target is constant, shape inference knows the rank and the
    full checker refuses the clash, so the annotation is rebuilt from the target."""
    if output.shape is None or len(output.shape) == len(target):
        return
    output.shape = ir.Shape([
        int(t) if t > 0 else (input_shape[i] if t == 0 and input_shape is not None and i < len(input_shape)
                              else ir.SymbolicDim(None))
        for i, t in enumerate(target)
    ])


def _differ(new, old) -> bool:
    if isinstance(new, int) or isinstance(old, int):
        return new != old
    return new.value != old.value


def _size_free_target(first: np.ndarray, second: np.ndarray, x_first: list[int], x_second: list[int]) -> np.ndarray | None:
    """One Reshape target valid at both sizes: the entries that do not change, 0 where the entry is the
    input's own size at that position, and -1 for at most one other size-dependent entry."""
    if first.shape != second.shape or first.ndim != 1:
        return None
    target = first.astype(np.int64).copy()
    inferred = [p for p, (a, b) in enumerate(zip(first, second)) if a != b]
    for p in list(inferred):
        if p < len(x_first) and first[p] == x_first[p] and second[p] == x_second[p]:
            target[p] = 0
            inferred.remove(p)
    if len(inferred) > 1 or (inferred and -1 in target):
        return None
    for p in inferred:
        target[p] = -1
    return target
