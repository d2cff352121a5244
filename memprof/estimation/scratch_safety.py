"""Which ops the estimator may run for real on made-up inputs, and how the others are measured or skipped.

To find an op's internal scratch memory the estimator runs the real CPU kernel once on real tensors shaped
like the fake ones. Their values are made up (random floats, zero integers; a copy of the real data where the
estimator keeps a shadow of a small tensor). That is sound only where the kernel's memory cannot depend on
those values and the values are valid for it. A kernel handed a buffer it trusts can write past its end and
corrupt the heap: ``mkldnn_rnn_layer_backward`` given a workspace sized by the fake kernel (empty, where the
real one is megabytes) aborts the process. :func:`decide` sorts each op:

``RUN``           run on made-up values: ATen/prims ops whose memory depends on shapes only. Zero integers
                  are valid indices (embedding, gather, index_select, index_put, nll_loss need the same
                  scratch on zeros as on random valid indices).
``NEEDS_VALUES``  run only where every tensor input has its real data (a shadow), else left unmeasured: ops
                  whose output size or validity follows input values (tags ``dynamic_output_shape`` and
                  ``data_dependent_output``; packed-sequence lengths, CTC targets, segment lengths, bag
                  offsets), and every op outside ``aten``/``prims``/``prim`` (custom and third-party
                  kernels: nothing says what they trust).
``RNN_BACKWARD``  ``mkldnn_rnn_layer_backward``, measured another way: the real ``mkldnn_rnn_layer`` forward
                  runs on the made-up inputs and the backward on what it returned (output, states,
                  workspace), so every buffer the backward reads is consistent.
``SKIP``          never run on made-up inputs: other kernels reading a forward's workspace or reserve buffer,
                  or a packed weight that holds a pointer.

The fake ``mkldnn_rnn_layer`` returns an empty workspace where the real one returns megabytes that autograd
keeps for backward; :func:`rnn_workspace_bytes` reads the real size once per signature (it depends on shapes,
dtypes and flags only) by running the real forward, and the estimator gives the fake op a workspace of that
size. Limits: ops whose inputs exceed the estimator's ``scratch_limit_bytes`` are not run, so such RNN layers
keep the fake kernel's empty workspace (the profile's assumptions say so); unmeasured ops are assumed to need
no scratch.
"""

from __future__ import annotations

import torch

from ..tracking.scratch import cpu_measure

__all__ = ["RUN", "NEEDS_VALUES", "RNN_BACKWARD", "SKIP", "RNN_FORWARD", "decide", "MadeUpInputs",
           "materialize", "rnn_workspace_bytes", "measure_rnn_backward"]

RUN, NEEDS_VALUES, RNN_BACKWARD, SKIP = "run", "needs-values", "rnn-backward", "skip"

_aten = torch.ops.aten
RNN_FORWARD = _aten.mkldnn_rnn_layer.default
_RNN_BACKWARD = _aten.mkldnn_rnn_layer_backward.default
_SAFE_NAMESPACES = frozenset({"aten", "prims", "prim"})

# Kernels that read a buffer written by another kernel (a forward's workspace, reserve space or gate
# activations; a packed weight), trusting its size and layout. Looked up by name: most exist only in CUDA/ROCm
# builds.
_TRUSTS_A_BUFFER = frozenset({
    "_cudnn_rnn_backward", "miopen_rnn_backward", "_thnn_fused_lstm_cell_backward",
    "_thnn_fused_lstm_cell_backward_impl", "_thnn_fused_gru_cell_backward", "_cudnn_ctc_loss_backward",
    "miopen_ctc_loss_backward", "_efficient_attention_backward", "_flash_attention_backward",
    "_cudnn_attention_backward", "_scaled_dot_product_cudnn_attention_backward",
    "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_flash_attention_backward",
    # packed weights that are a pointer stored in a uint8 tensor (fbgemm's dynamic quantization)
    "fbgemm_linear_fp16_weight", "fbgemm_linear_fp16_weight_fp32_activation", "fbgemm_linear_int8_weight",
    "fbgemm_linear_int8_weight_fp32_activation",
})

# ATen ops without a value tag whose output size or validity follows their inputs' values.
_VALUE_DEPENDENT = frozenset({
    "_pack_padded_sequence", "_pad_packed_sequence", "_pack_padded_sequence_backward", "_ctc_loss",
    "_ctc_loss_backward", "ctc_loss", "segment_reduce", "_segment_reduce_backward", "_embedding_bag",
    "_embedding_bag_forward_only", "_embedding_bag_backward", "_embedding_bag_dense_backward",
    "_embedding_bag_sparse_backward", "_embedding_bag_per_sample_weights_backward", "embedding_bag",
    "_unique", "_unique2", "unique_dim", "unique_consecutive", "masked_select", "nonzero", "bincount",
    "repeat_interleave", "histogramdd", "_histogramdd_bin_edges",
})

_VALUE_TAGS = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)

_decisions: dict = {}


def _base_name(func) -> str:
    return func._schema.name.split("::", 1)[-1]


def decide(func) -> str:
    """How the estimator may measure ``func``'s scratch: one of RUN, NEEDS_VALUES, RNN_BACKWARD, SKIP."""
    hit = _decisions.get(func)
    if hit is not None:
        return hit
    name = _base_name(func)
    if func is _RNN_BACKWARD:
        d = RNN_BACKWARD
    elif name in _TRUSTS_A_BUFFER:
        d = SKIP
    elif func.namespace not in _SAFE_NAMESPACES or name in _VALUE_DEPENDENT \
            or any(t in func.tags for t in _VALUE_TAGS):
        d = NEEDS_VALUES
    else:
        d = RUN
    _decisions[func] = d
    return d


_REASONS = {
    SKIP: "reads a buffer another kernel wrote (a workspace, a packed weight)",
    NEEDS_VALUES: "its memory or validity follows input values the estimate does not have",
}


class MadeUpInputs:
    """Runs real CPU kernels on made-up inputs for the estimator, where :func:`decide` allows it, and notes
    what it ran another way or left unmeasured (:meth:`assumptions`)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes  # inputs over this many bytes are not run
        self.unmeasured: dict[str, str] = {}  # op name -> why it was not run
        self.other_way: dict[str, str] = {}  # op name -> how it was measured instead
        self.workspaces: dict[str, int] = {}  # "shapes" -> real workspace bytes given to the fake op
        self.workspace_unsized = 0  # fake RNN forwards left with the fake kernel's workspace

    def may_run(self, func, has_values) -> bool:
        """Whether ``func`` may run; ``has_values()`` says whether every tensor input has its real data."""
        how = decide(func)
        if how == SKIP or (how == NEEDS_VALUES and not has_values()):
            self.unmeasured.setdefault(str(func), _REASONS[how])
            return False
        return True

    def measure(self, func, args, kwargs, shadow_of, seen=None) -> int | None:
        """``func``'s scratch bytes on real tensors shaped like the fake ``args``; None if its kernel
        refused them. ``seen(real_output)`` is called with the real kernel's output (not for the RNN
        backward, measured another way)."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily


        with unset_fake_temporarily():
            try:
                r_args, r_kwargs = materialize_args(args, kwargs, shadow_of)
                if decide(func) == RNN_BACKWARD:
                    excess = measure_rnn_backward(r_args, r_kwargs, cpu_measure)
                    self.other_way.setdefault(str(func), "measured on the output, states and workspace of a "
                                              "real forward on the same inputs")
                    return excess
                r_out, excess = cpu_measure(func, r_args, r_kwargs)
                if seen is not None:
                    seen(r_out)
                return excess
            except Exception:  # a kernel that rejects the made-up values simply goes unmeasured
                return None

    def rnn_workspace(self, key, args, kwargs, out, shadow_of):
        """The fake ``mkldnn_rnn_layer``'s outputs with a workspace of the real kernel's size (``key``: the
        op's signature)."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        ws = out[3]
        fakes = list(fake_tensors((args, tuple(kwargs.values()))))
        if ws is None or any(t.device.type != "cpu" for t in fakes):
            return out
        if sum(t.untyped_storage().nbytes() for t in fakes) > self.limit:
            self.workspace_unsized += 1
            return out
        with unset_fake_temporarily():
            try:
                size = rnn_workspace_bytes(key, *materialize_args(args, kwargs, shadow_of))
            except Exception:
                self.workspace_unsized += 1
                return out
        if ws.untyped_storage().nbytes() >= size:
            return out
        self.workspaces[str(key[1][1:3])] = size
        return (*out[:3], torch.empty(size // ws.element_size(), dtype=ws.dtype, device=ws.device))

    def assumptions(self) -> dict[str, str]:
        out = {}
        if self.unmeasured:
            out["scratch_unmeasured"] = (
                "not run on made-up inputs, op-internal scratch assumed none: "
                + "; ".join(f"{op} ({why})" for op, why in sorted(self.unmeasured.items())))
        if self.other_way:
            out["scratch_other_way"] = "; ".join(f"{op}: {how}" for op, how in sorted(self.other_way.items()))
        if self.workspaces or self.workspace_unsized:
            text = (f"{RNN_FORWARD}'s workspace (kept for backward) sized from the real kernel, which "
                    f"the fake kernel leaves empty: {len(self.workspaces)} signatures")
            if self.workspaces:
                text += " (" + ", ".join(f"{b} bytes" for b in sorted(set(self.workspaces.values()))) + ")"
            if self.workspace_unsized:
                text += (f"; {self.workspace_unsized} calls not run (inputs over {self.limit} bytes, or "
                         "refused) keep an empty workspace: the estimate is low by its size")
            out["rnn_workspace"] = text
        return out


def fake_tensors(x):
    """The fake tensors in ``x`` (a tensor, or nested lists and tuples of them)."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(x, FakeTensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from fake_tensors(y)


def materialize_args(args, kwargs, shadow_of=None):
    """Real CPU arguments shaped like the fake ones (fake tensors sharing a storage share one here too)."""
    reals: dict[int, torch.Tensor] = {}
    r_args = materialize(args, reals, shadow_of)
    return r_args, {k: materialize(v, reals, shadow_of) for k, v in kwargs.items()}


def materialize(x, reals: dict, shadow_of=None):
    """A real CPU tensor with the fake one's dtype, shape, strides and offset (same storage -> same tensor):
    a copy of its shadow's data when ``shadow_of(storage)`` has one, else random floats and zero integers
    (zeros are valid indices for embeddings, gathers and losses)."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(x, FakeTensor):
        storage = x.untyped_storage()
        base = reals.get(id(storage))
        if base is None:
            n = max(1, storage.nbytes() // x.element_size())
            shadow = shadow_of(storage) if shadow_of is not None else None
            if shadow is not None and shadow.nbytes() == storage.nbytes():
                base = torch.empty(0, dtype=x.dtype).set_(shadow.clone(), 0, (n,), (1,))
            elif x.dtype.is_floating_point or x.dtype.is_complex:
                base = torch.randn(n, dtype=torch.float32).to(x.dtype)
            else:
                base = torch.zeros(n, dtype=x.dtype)
            reals[id(storage)] = base
        out = base.as_strided(x.shape, x.stride(), x.storage_offset())
        return out.requires_grad_(x.requires_grad) if x.requires_grad and x.is_leaf else out
    if isinstance(x, (list, tuple)):
        return type(x)(materialize(y, reals, shadow_of) for y in x)
    return x


_WORKSPACE: dict = {}  # signature -> workspace bytes of the real mkldnn_rnn_layer


def rnn_workspace_bytes(key, real_args, real_kwargs) -> int:
    """The real ``mkldnn_rnn_layer``'s workspace bytes for these real (made-up) inputs, cached under ``key``
    and the grad mode (the kernel keeps a workspace only where gradients are wanted)."""
    key = (key, torch.is_grad_enabled())
    hit = _WORKSPACE.get(key)
    if hit is None:
        ws = RNN_FORWARD(*real_args, **real_kwargs)[3]
        hit = 0 if ws is None else ws.untyped_storage().nbytes()
        _WORKSPACE[key] = hit
    return hit


def _forward_args(args):
    """``mkldnn_rnn_layer``'s arguments from ``mkldnn_rnn_layer_backward``'s (both by position, as ATen's
    autograd formula passes them)."""
    (inp, w1, w2, w3, w4, hx, cx, _out, _hy, _cy, _go, _ghy, _gcy, reverse, mode, hidden_size, num_layers,
     has_biases, train, bidirectional, batch_sizes, batch_first, _ws) = args
    return (inp, w1, w2, w3, w4, hx, cx, reverse, batch_sizes, mode, hidden_size, num_layers, has_biases,
            bidirectional, batch_first, train)


def measure_rnn_backward(args, kwargs, cpu_measure) -> int:
    """Scratch of ``mkldnn_rnn_layer_backward`` on real, made-up ``args``: the real forward makes the output,
    states and workspace the backward reads, then the backward alone is measured with ``cpu_measure``."""
    if kwargs:
        names = [a.name for a in _RNN_BACKWARD._schema.arguments]
        args = tuple(args) + tuple(kwargs[n] for n in names[len(args):])
    with torch.enable_grad():  # as the forward that made the workspace ran (backward runs without grad mode)
        out, hy, cy, workspace = RNN_FORWARD(*_forward_args(args))
    args = list(args)
    args[7], args[8], args[9], args[22] = out, hy, cy, workspace
    _, excess = cpu_measure(_RNN_BACKWARD, tuple(args), {})
    return excess
