"""Canonicalising a foreign ONNX classifier before any other pass: one graph form, whatever the exporter wrote.

Exporters leave behind arithmetic that is constant at build time and spell the same layer in different ways:
the TorchScript exporter computes TF "same" padding through ConstantOfShape → Concat → Reshape → Slice →
Transpose → Cast chains; paddle2onnx writes every constant as a Constant node, the conv bias as a separate
``Add(Conv(x, W), Reshape(b, [1, C, 1, 1]))`` and keeps BatchNormalization unfolded; newer paddle2onnx puts
Identity nodes inside blocks. Every later pass (SE recognition, calibration, FP16/INT8 conversion) would have to
know each spelling; instead, :func:`canonicalize` rewrites them into one form with onnxscript's optimizer, a
maintained library (no hand-written constant folding here):

1. functions inlined, every Constant node lifted to an initializer (onnx-ir passes);
2. repeated until nothing changes: constant folding (``onnxscript.optimizer.fold_constants``, ConstantOfShape
   included: here it only ever makes pad and shape vectors), then onnxscript's rewrite rules — no-op
   elimination, BatchNormalization into Conv/Gemm, Pad into Conv, successive Relu/Clip — plus
   :class:`ConvBiasAdd` (a per-channel bias Add after a Conv becomes the Conv's bias), then dead nodes removed;
3. Identity nodes removed (``IdentityEliminationPass``), graph output names kept.

What is *not* run, on purpose: initializer deduplication and common-subexpression elimination. They merge equal
weights of different layers, and a weight shared by two layers is one the SE fusion and the per-layer INT8
passes must refuse to rewrite.

The result computes the same function (checked numerically by the build pipeline against the input model). A
graph the optimizer cannot change is returned as an equal copy (``report.changed`` False), so sedeploy's own
exports, which hold nothing to fold, pass through untouched.

:func:`check_graph` refuses up front, with the node names, what no later pass can handle: control flow
(``If``/``Loop``/``Scan``) and operators outside the standard ONNX domain.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from sedeploy.errors import SedeployError

log = logging.getLogger("sedeploy.passes")

#: The oldest default-domain opset the passes and the INT8 forms accept (QuantizeLinear with per-channel axis);
#: an older model is converted up to it with onnx's version converter.
MIN_OPSET = 13
#: constant folding limits (elements): weights computed from constants (a transposed kernel) fold as well
FOLD_SIZE_LIMIT = 1 << 24
#: folding and rewriting alternate until a round changes nothing, at most this many rounds
MAX_ROUNDS = 8
CONTROL_FLOW = ("If", "Loop", "Scan")
STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass
class CanonicalReport:
    """What canonicalisation changed: node counts and op-type histograms before and after."""

    changed: bool
    nodes_before: int
    nodes_after: int
    ops_before: dict = field(default_factory=dict)
    ops_after: dict = field(default_factory=dict)
    opset_before: int | None = None
    opset_after: int | None = None
    rounds: int = 0
    seconds: float = 0.0

    def removed(self) -> dict:
        """Op types whose count dropped, with how many were removed (what the summary lists)."""
        return {op: n - self.ops_after.get(op, 0) for op, n in sorted(self.ops_before.items())
                if n > self.ops_after.get(op, 0)}

    def as_dict(self) -> dict:
        return {"changed": self.changed, "nodes_before": self.nodes_before, "nodes_after": self.nodes_after,
                "removed": self.removed(), "ops_after": dict(self.ops_after), "opset_before": self.opset_before,
                "opset_after": self.opset_after, "rounds": self.rounds, "seconds": self.seconds}


def _conv_bias_rule():
    """:class:`ConvBiasAdd` as an onnxscript rewrite rule set (both operand orders of the Add)."""
    import onnx_ir as ir
    from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

    class ConvBiasAdd(RewriteRuleClassBase):
        """``Add(Conv(x, W[, b0]), b)`` → ``Conv(x, W, b0 + b)`` when ``b`` is a constant with one value per
        output channel (N×C×… broadcast: shape [C,1,…,1] or [1,C,1,…,1])."""

        def pattern(self, op, x, w, b):
            return op.Add(op.Conv(x, w, _allow_other_inputs=True, _outputs=["conv_out"]), b)

        def check(self, context, x, w, b, conv_out, **_) -> MatchResult:
            res = MatchResult()
            conv = conv_out.producer()
            if w.const_value is None or w.is_graph_input():
                return res.fail("the Conv weight is not a constant")
            if b.const_value is None or b.is_graph_input():
                return res.fail("the added term is not a constant")
            if len(conv_out.uses()) != 1 or conv_out.is_graph_output():
                return res.fail("the Conv output is used elsewhere")
            old = conv.inputs[2] if len(conv.inputs) > 2 else None
            if old is not None and (old.const_value is None or old.is_graph_input() or len(old.uses()) != 1):
                return res.fail("the Conv bias is not a constant of this Conv only")
            rank, cout = w.const_value.shape.rank(), int(w.const_value.shape[0])
            shape = [int(d) for d in b.const_value.shape]
            if len(shape) > rank:
                return res.fail(f"the added constant has rank {len(shape)} > {rank}: it broadcasts the output")
            full = [1] * (rank - len(shape)) + shape
            if any(d != 1 for i, d in enumerate(full) if i != 1) or full[1] != cout:
                # a scalar offset stays: it belongs to what follows (Add(3) of a hard sigmoid written out)
                return res.fail(f"the added constant of shape {shape} is not one value per output channel")
            if b.const_value.dtype != w.const_value.dtype:
                return res.fail("the added constant has another element type")
            return res

        def rewrite(self, op, x, w, b, conv_out, **_):
            conv = conv_out.producer()
            cout = int(w.const_value.shape[0])
            add = b.const_value.numpy().reshape(-1)
            old = conv.inputs[2] if len(conv.inputs) > 2 else None
            base = old.const_value.numpy() if old is not None else np.zeros(cout, add.dtype)
            name = f"{conv.name or conv_out.name}.bias_folded"
            bias = op.initializer(ir.tensor(np.ascontiguousarray((base + add).astype(add.dtype)), name=name), name)
            return op.Conv(x, w, bias, **conv.attributes)

    return RewriteRuleSet(ConvBiasAdd.rule().commute())


def _rules():
    from onnxscript.rewriter import RewriteRuleSet
    from onnxscript.rewriter.rules import common as r

    rules = [*r.mul_by_1_rule.commute(), *r.add_0_rule.commute(), r.sub_0_rule, r.div_by_1_rule,
             r.dropout_zero_rule, r.dropout_inference_rule, r.no_op_cast_rule, r.no_op_expand_rule,
             r.no_op_transpose_rule, r.cast_cast_rule, r.transpose_transpose_rule, r.reshape_reshape_rule,
             r.unsqueeze_unsqueeze_rule, r.fuse_batchnorm_into_conv_rule, r.fuse_batchnorm_into_gemm_rule,
             r.normalize_pad_format_conv_rule, r.fuse_pad_into_conv_rule, r.successive_relu_rule,
             r.successive_relu_clip_rule, r.successive_clip_relu_rule, r.successive_clip_rule]
    return RewriteRuleSet([*rules, *_conv_bias_rule().rules])


def _fold_policy(node) -> bool | None:
    # onnxscript keeps ConstantOfShape by default (to keep large zero tensors implicit); an image classifier's
    # ConstantOfShape makes pad/shape vectors, and folding it is what lets the rest of the chain fold
    return True if node.op_type == "ConstantOfShape" and node.domain in STANDARD_DOMAINS else None


def default_opset(proto) -> int | None:
    return next((int(o.version) for o in proto.opset_import if o.domain in STANDARD_DOMAINS), None)


def upgrade_opset(proto, *, label: str):
    """``proto`` at opset :data:`MIN_OPSET` when it is older (onnx's version converter), else unchanged; a model
    the converter cannot convert is refused, naming ``label``."""
    import onnx
    from onnx import version_converter

    opset = default_opset(proto)
    if opset is None or opset >= MIN_OPSET:
        return proto
    try:
        out = version_converter.convert_version(proto, MIN_OPSET)
        onnx.checker.check_model(out)
    except (RuntimeError, ValueError, IndexError, KeyError, onnx.checker.ValidationError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SedeployError(f"'{label}' uses ONNX opset {opset}; sedeploy needs opset {MIN_OPSET} or newer and "
                            f"onnx's version converter could not convert it ({type(err).__name__}: {first}).",
                            expected=f"an ONNX model at opset {MIN_OPSET} or newer",
                            fix=f"re-export the model at opset {MIN_OPSET} or newer (e.g. 17)") from err
    log.info("'%s' upgraded from opset %d to %d (onnx version converter)", label, opset, MIN_OPSET)
    return out


def check_graph(proto, *, label: str) -> None:
    """Refuse what no later pass handles, naming the nodes: control flow and non-standard operator domains (a
    model-local function is fine: it is inlined)."""
    local = {(f.domain, f.name) for f in proto.functions}
    flow = [f"{n.op_type} '{n.name or n.output[0]}'" for n in proto.graph.node if n.op_type in CONTROL_FLOW
            and n.domain in STANDARD_DOMAINS]
    if flow:
        raise SedeployError(f"'{label}' holds control flow: {', '.join(flow[:6])}"
                            + (" …" if len(flow) > 6 else "") + ".",
                            expected="a feed-forward image classifier (no If/Loop/Scan)",
                            fix="re-export the model traced for inference (e.g. torch.onnx.export of the model in "
                                "eval mode), so its branches are resolved at export time")
    custom = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node
                     if n.domain not in STANDARD_DOMAINS and (n.domain, n.op_type) not in local})
    if custom:
        raise SedeployError(f"'{label}' uses operator(s) outside the standard ONNX domain: {', '.join(custom)}.",
                            expected="standard ONNX operators only (every backend and pass reads those)",
                            fix="re-export the model without custom or contrib operators (e.g. without ONNX "
                                "Runtime's offline graph optimizations)")


def check_shapes(proto, *, label: str) -> None:
    """ONNX shape inference must accept the model (every pass relies on it): its error, named, otherwise."""
    import onnx

    try:
        onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:400]
        raise SedeployError(f"ONNX shape inference rejects '{label}': {first}",
                            expected="a model whose declared shapes and types agree with its operators "
                                     "(onnx.shape_inference.infer_shapes(model, strict_mode=True) passes)",
                            fix="re-export the model with a current exporter, or fix the inconsistent shape or "
                                "type the message names") from err


def canonicalize(proto, *, label: str = "model"):
    """(canonical onnx.ModelProto, :class:`CanonicalReport`) for ``proto``; see the module docstring. ``proto``
    is not modified. ``label`` names the model in errors (the user's file, never an intermediate one)."""
    import onnx
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import fold_constants
    from onnxscript.rewriter import RewritePass

    t0 = time.perf_counter()
    before = Counter(n.op_type for n in proto.graph.node)
    opset_before = default_opset(proto)
    work = upgrade_opset(proto, label=label)
    check_graph(work, label=label)
    check_shapes(work, label=label)
    rounds = 0
    try:
        model = ir.serde.deserialize_model(work)
        common.InlinePass()(model)
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        rewrite = RewritePass(_rules())
        for rounds in range(1, MAX_ROUNDS + 1):
            folded = fold_constants(model, onnx_shape_inference=True, input_size_limit=FOLD_SIZE_LIMIT,
                                    output_size_limit=FOLD_SIZE_LIMIT, should_fold=_fold_policy)
            rewritten = rewrite(model).modified
            pruned = common.RemoveUnusedNodesPass()(model).modified
            if not (folded.modified or rewritten or pruned):
                break
        for p in (common.IdentityEliminationPass(), common.RemoveUnusedNodesPass(),
                  common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
                  common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                  common.OutputFixPass(), common.NameFixPass()):
            p(model)
        out = ir.serde.serialize_model(model)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, AttributeError) as err:
        raise SedeployError(f"Canonicalising '{label}' failed in onnxscript's optimizer ({type(err).__name__}: "
                            f"{(str(err).strip().splitlines() or [''])[0][:300]}).",
                            fix="report this as a sedeploy bug with the model") from err
    check_graph(out, label=label)
    after = Counter(n.op_type for n in out.graph.node)
    changed = after != before or default_opset(out) != opset_before or len(out.graph.initializer) != len(
        proto.graph.initializer)
    if not changed:  # nothing to fold: the input as it was (byte for byte)
        out = onnx.ModelProto()
        out.CopyFrom(proto)
    report = CanonicalReport(changed=changed, nodes_before=len(proto.graph.node), nodes_after=len(out.graph.node),
                             ops_before=dict(before), ops_after=dict(after), opset_before=opset_before,
                             opset_after=default_opset(out), rounds=rounds,
                             seconds=round(time.perf_counter() - t0, 3))
    log.info("Canonicalised '%s': nodes %d → %d in %d round(s) (%.2f s); removed %s", label, report.nodes_before,
             report.nodes_after, rounds, report.seconds, report.removed() or "nothing")
    return out, report
