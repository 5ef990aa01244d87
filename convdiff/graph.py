"""A Keras model as a flat list of layer calls in execution order.

Functional and Sequential models are walked through Keras's own node structure, depth by depth
as Keras executes them; a nested model is expanded in place, so its inner layers become rows of
their own (named ``outer/inner``). Each :class:`GraphNode` knows which tensors it reads and
writes, by convdiff's own tensor keys, so the runner can feed either side's values.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convdiff.kernels import LayerSpec


def layer_matches(pattern: str, name: str, class_name: str) -> bool:
    """Whether a case-sensitive shell-style glob names this layer call: its full name
    (``outer/conv#2``), its bare layer name (``conv``: every call of a shared or nested layer)
    or its class name (``Conv2D``). What ``--layers``, ``--impl`` and budget overrides match."""
    base = name.split("/")[-1].split("#")[0]
    return any(fnmatch.fnmatchcase(n, pattern) for n in (name, base, class_name))


@dataclass
class GraphNode:
    """One call of one layer (a shared layer called twice gives two nodes).

    Attributes:
        name: the layer's name, ``outer/inner`` inside a nested model, ``name#2`` for the
            second call of a shared layer.
        layer: the Keras layer (or operation) object.
        inputs: keys of the tensors it reads, in the order of its flattened arguments.
        outputs: keys of the tensors it writes.
        call: runs the Keras layer on a list of input values (one per ``inputs`` key) and
            returns its flattened outputs.
        keras_node: Keras's own record of the call (its arguments, its output dtypes).
    """

    name: str
    layer: Any
    inputs: list[int]
    outputs: list[int]
    call: Callable[[Sequence[Any]], list[Any]]
    keras_node: Any = None

    def spec(self) -> LayerSpec:
        """The kernel's view of this call (see :func:`layer_spec`)."""
        return layer_spec(self.layer, self.keras_node)

    @property
    def class_name(self) -> str:
        return type(self.layer).__name__


@dataclass
class Graph:
    """The model's input tensor keys and names, its output keys, and its nodes in order, built
    once per model (:func:`as_graph`) and passed to everything that walks the model."""

    inputs: list[int]
    input_names: list[str]
    outputs: list[int]
    nodes: list[GraphNode] = field(default_factory=list)
    model: Any = None

    def consumers(self) -> Counter[int]:
        """How many node inputs (and model outputs) read each tensor: for freeing early."""
        counts: Counter[int] = Counter(self.outputs)
        for node in self.nodes:
            counts.update(node.inputs)
        return counts


def as_graph(model: Any) -> Graph:
    """``model``'s :class:`Graph`: a Graph as it is, a Keras model flattened."""
    return model if isinstance(model, Graph) else build_graph(model)


def build_graph(model: Any) -> Graph:
    """Flatten ``model`` (Sequential or Functional, possibly nested) into a :class:`Graph`."""
    functional = _as_functional(model)
    inputs = [id(t) for t in functional.inputs]
    names = [_input_name(t, i) for i, t in enumerate(functional.inputs)]
    graph = Graph(inputs=inputs, input_names=names, outputs=[], model=model)
    alias: dict[int, int] = {}
    _walk(functional, prefix="", alias=alias, graph=graph)
    graph.outputs = [alias.get(id(t), id(t)) for t in functional.outputs]
    _number_shared_calls(graph.nodes)
    return graph


def _as_functional(model: Any) -> Any:
    functional = getattr(model, "_functional", None)  # a built Sequential wraps one
    return functional if functional is not None else model


def _is_graph_model(op: Any) -> bool:
    target = _as_functional(op)
    return hasattr(target, "_nodes_by_depth") and hasattr(target, "inputs")


def _input_name(tensor: Any, i: int) -> str:
    history = getattr(tensor, "_keras_history", None)
    layer = getattr(history, "operation", None)
    return getattr(layer, "name", None) or getattr(tensor, "name", None) or f"input_{i}"


def _walk(model: Any, prefix: str, alias: dict[int, int], graph: Graph) -> None:
    """Append ``model``'s nodes to ``graph`` in Keras's execution order."""
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            op = node.operation
            if op is None or node.is_input:
                continue
            in_keys = [alias.get(id(t), id(t)) for t in node.input_tensors]
            if _is_graph_model(op):
                inner = _as_functional(op)
                for t, key in zip(inner.inputs, in_keys, strict=True):
                    alias[id(t)] = key
                _walk(inner, f"{prefix}{op.name}/", alias, graph)
                for outer, t in zip(node.outputs, inner.outputs, strict=True):
                    alias[id(outer)] = alias.get(id(t), id(t))
                continue
            graph.nodes.append(
                GraphNode(
                    name=f"{prefix}{op.name}",
                    layer=op,
                    inputs=in_keys,
                    outputs=[id(t) for t in node.outputs],
                    call=_caller(node),
                    keras_node=node,
                )
            )


def _caller(node: Any) -> Callable[[Sequence[Any]], list[Any]]:
    """A function that calls the node's layer the way Keras's functional executor does:
    the node's recorded arguments with its input tensors filled in, in inference mode."""
    import keras  # only reached once a model is loaded
    from keras import tree

    tensors = list(node.input_tensors)
    is_layer = isinstance(node.operation, keras.layers.Layer)

    def call(values: Sequence[Any]) -> list[Any]:
        args, kwargs = node.arguments.fill_in(
            {id(t): v for t, v in zip(tensors, values, strict=True)}
        )
        if is_layer:
            kwargs = {**kwargs, "training": False}
        return list(tree.flatten(node.operation(*args, **kwargs)))

    return call


def _number_shared_calls(nodes: list[GraphNode]) -> None:
    seen: Counter[str] = Counter()
    for node in nodes:
        seen[node.name] += 1
        if seen[node.name] > 1:
            node.name = f"{node.name}#{seen[node.name]}"


def layer_spec(layer: Any, keras_node: Any = None) -> LayerSpec:
    """The kernel's view of a Keras layer: class, config, weights by short name, dtype.

    A ``keras.ops`` operation recorded in a functional graph (``x + 3.0``) has no weights and
    an empty config; what its kernel needs comes from the call, ``keras_node``: its positional
    arguments as ``config["call_args"]`` (each tensor replaced by None, constants as they
    are), and its output's dtype as the compute dtype.
    """
    weights: dict[str, np.ndarray] = {}
    for variable in getattr(layer, "weights", []):
        key = variable.name if variable.name not in weights else variable.path
        weights[key] = np.asarray(variable.numpy() if hasattr(variable, "numpy") else variable)
    try:
        config = layer.get_config()
    except NotImplementedError:
        config = {}
    dtype = getattr(layer, "compute_dtype", None) or "float32"
    if keras_node is not None and not _is_layer(layer):
        config = {**config, "call_args": _call_args(keras_node)}
        dtype = getattr(keras_node.outputs[0], "dtype", None) or dtype
    return LayerSpec(
        name=layer.name,
        class_name=type(layer).__name__,
        config=config,
        weights=weights,
        dtype=str(dtype),
    )


def _is_layer(op: Any) -> bool:
    import keras  # only reached once a model is loaded

    return isinstance(op, keras.layers.Layer)


def _call_args(keras_node: Any) -> list[Any]:
    """The node's positional arguments, each symbolic tensor replaced by None."""
    import keras
    from keras import tree

    return tree.map_structure(
        lambda a: None if isinstance(a, keras.KerasTensor) else a,
        list(keras_node.arguments.args),
    )
