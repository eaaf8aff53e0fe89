"""One kind's ``torch.library`` wiring from its description (``kernel_op``).

A fast path with its own kernels is one opaque custom op, so that
``torch.compile(fullgraph=True)`` and ``torch.export`` see a single node:
the op, its fake (meta) implementation, a backward op with its fake, and the
autograd registration that connects them. Eager calls skip the op's
dispatch (tens of microseconds of host time per call, docs/triton-perf.md)
and run an ``autograd.Function`` with the same forward and backward:
same kernels, same bits. ``kernel_op`` builds all of it from one
description and returns the callable that picks the eager or the op path
(``eager_call``).

What a kind describes (mean_pool's, abridged)::

    mean_pool_op = kernel_op(
        "kvcompress::mean_pool_triton",
        inputs="Tensor x, Tensor? pe, Tensor? cu_seqlens, SymInt block_size, SymInt stride, str padding, "
               "SymInt total_windows",
        grads={"x": "need_x", "pe": "need_pe"},
        saved=("x", "pe", "cu_seqlens", "block_size", "stride", "padding"),
        forward=_forward, fake=_fake, backward=_backward)
    y = mean_pool_op(x, pe, cu_seqlens, block_size, stride, padding, total)

The backward op is ``<name>_bwd(dy, *saved, *flags)`` returning one
gradient per ``grads`` entry (an empty (0,) tensor for one not asked for:
custom op outputs may not alias).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["eager_call", "kernel_op"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)


# whether a functorch transform (vmap, grad, jacrev, ...) is running; torch's own autograd.Function asks the same
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def eager_call(x: torch.Tensor) -> bool:
    """Whether a call may skip the ``torch.library`` custom op and run the
    kind's ``autograd.Function`` (or, with nothing to differentiate, its
    forward) directly (same kernels, same bits): x is a plain tensor and
    nothing traces or transforms (torch.compile, torch.export, make_fx, fake
    tensors and functorch's vmap and grad all go through the op, which
    they see as one node; vmap runs it through torch's per-sample fallback).
    The op's dispatch costs tens of microseconds of host time per call.
    ``torch.compiler.is_compiling()`` comes first: dynamo folds it to True."""
    return (not torch.compiler.is_compiling() and type(x) in _PLAIN and _get_current_dispatch_mode() is None
            and not _transforms_active())


_ARG = re.compile(r"^\s*(Tensor\??|SymInt|int|float|bool|str)\s+([A-Za-z_]\w*)\s*$")


def _parse(inputs: str) -> list[tuple[str, str]]:
    """[(type, name)] of a schema argument list such as "Tensor x, SymInt L"."""
    out = []
    for part in inputs.split(","):
        m = _ARG.match(part)
        if m is None:
            raise ValueError(f"kernel_op: cannot read the argument {part.strip()!r} (want '<type> <name>')")
        out.append((m.group(1), m.group(2)))
    return out


def _results(n: int) -> str:
    return "Tensor" if n == 1 else "(" + ", ".join(["Tensor"] * n) + ")"


def kernel_op(name: str, *, inputs: str, grads: Mapping[str, str], saved: Sequence[str],
              forward: Callable, fake: Callable, backward: Callable, outputs: Sequence[str] = ("y",),
              grad_shapes: Mapping[str, Callable] | None = None, grads_like: Sequence[str] = ()) -> Callable:
    """The custom op ``name`` (``"kvcompress::<kind>_triton"``), its backward
    op ``name + "_bwd"``, their fakes, the autograd registration and the eager
    ``autograd.Function``, from one description. Returns ``call(*args)``
    taking the op's inputs in order, which runs the Function when
    ``eager_call(first input)`` allows and the op otherwise; the op is
    ``call.op``, the Function ``call.function`` (named ``_<Kind>Fn`` from a
    name ``<kind>_<backend>``: ``_MeanPoolFn``).

    inputs: the op's arguments in schema syntax, in order ("Tensor x,
        Tensor? pe, SymInt block_size, str padding, bool need_lse"); types
        Tensor, Tensor?, SymInt, int, float, bool, str. The first is a
        tensor: it decides the eager path, and gradients take its dtype and
        device.
    grads: {input: flag name} of the inputs that can take a gradient, in
        input order; the backward op takes one bool per entry, named by its
        flag, and returns one gradient per entry.
    saved: the inputs and outputs the backward takes, in the backward op's
        order, after dy (tensors are saved for backward, the rest kept on
        the autograd context).
    outputs: the names of the op's tensor outputs, default ("y",): one, the
        result; more (then the op returns a tuple), the result and
        statistics the backward may take (attention_pool's log-sum-exp),
        which are not differentiable.
    forward(**inputs) -> (output, state): output a tensor, or a tuple of
        ``len(outputs)`` tensors; state is any host object (the windowing
        plan) that an eager call hands to its backward, so the backward
        need not recompute it. An eager call with nothing to differentiate
        (grad mode off, or no input tensor requiring grad) runs it alone.
    fake(**inputs) -> output: the fake (meta) output: shapes, dtypes,
        strides.
    backward(dy, state=, **saved, **flags) -> one gradient per ``grads``
        entry, an empty (0,) tensor for each not needed; state is the
        forward's state in an eager call, None through the op.
    grad_shapes: {input: shape(saved) -> tuple} for the gradients of inputs
        the backward is not given (biases); the fake backward gives every
        other gradient its input's shape, the first input's gradient its
        strides too (as ``empty_like``).
    grads_like: further inputs whose gradient the backward allocates with
        ``empty_like`` (their strides), e.g. gated_pool's per-token z;
        the fake backward then gives them their input's strides too.

    Raises ValueError for a description that does not fit together.
    """
    args = _parse(inputs)
    names = [n for _, n in args]
    types = dict((n, t) for t, n in args)
    flags = list(grads.values())
    if not types[names[0]].startswith("Tensor") or names[0] not in saved:
        raise ValueError(f"kernel_op {name}: the first input must be a tensor the backward takes")
    types.update((n, "Tensor") for n in outputs)
    if not set(grads) <= set(names) or [n for n in names if n in grads] != list(grads) \
            or not set(saved) <= set(types) or len(types) != len(names) + len(outputs):
        raise ValueError(f"kernel_op {name}: grads must name inputs in input order, saved inputs or outputs, "
                         "each name once")
    grad_shapes = dict(grad_shapes or {})
    if not set(grads) - set(saved) <= set(grad_shapes):
        raise ValueError(f"kernel_op {name}: gradients of inputs not saved need grad_shapes")
    saved_t = [n for n in saved if types[n].startswith("Tensor")]      # through save_for_backward
    saved_v = [n for n in saved if n not in saved_t]                     # kept on ctx
    grad_pos = [names.index(n) for n in grads]
    bwd_inputs = ", ".join(["Tensor dy", *(f"{types[n]} {n}" for n in saved), *(f"bool {f}" for f in flags)])
    bwd_params = ["dy", *saved, *flags]

    def run_forward(values):
        return forward(**dict(zip(names, values)))[0]

    def run_backward(values, state):
        kw = dict(zip(bwd_params, values))
        return tuple(backward(kw.pop("dy"), state=state, **kw))

    op = torch.library.custom_op(name, lambda *values: run_forward(values), mutates_args=(),
                                 schema=f"({inputs}) -> {_results(len(outputs))}")
    op.register_fake(lambda *values: fake(**dict(zip(names, values))))
    bwd_op = torch.library.custom_op(name + "_bwd", lambda *values: run_backward(values, None), mutates_args=(),
                                     schema=f"({bwd_inputs}) -> {_results(len(grads))}")

    def fake_backward(*values):
        kw = dict(zip(bwd_params, values))
        first = kw[names[0]]
        out = []
        for n, f in grads.items():
            t = kw.get(n)
            if not kw[f] or (n in kw and t is None):
                out.append(first.new_empty(0))
            elif n == names[0] or n in grads_like:
                out.append(torch.empty_like(t if n in kw else first, memory_format=torch.preserve_format))
            else:
                out.append(first.new_empty(t.shape if n in kw else grad_shapes[n](kw)))
        return tuple(out)

    bwd_op.register_fake(fake_backward)

    # positions, computed once: in (*inputs, *outputs) of what is saved; in (*saved_t, *saved_v) of saved
    at = {n: i for i, n in enumerate([*names, *outputs])}
    saved_t_at, saved_v_at = [at[n] for n in saved_t], [at[n] for n in saved_v]
    unpack_at = [[*saved_t, *saved_v].index(n) for n in saved]

    def keep(ctx, values, results):
        """What the backward needs, on ctx: saved tensors, the other saved arguments."""
        both = (*values, *results)
        ctx.save_for_backward(*[both[i] for i in saved_t_at])
        ctx.kept = tuple([both[i] for i in saved_v_at])
        if len(results) > 1:
            ctx.mark_non_differentiable(*results[1:])

    def unpack(ctx):
        both = (*ctx.saved_tensors, *ctx.kept)
        needs = ctx.needs_input_grad
        return tuple([both[i] for i in unpack_at]), [needs[i] for i in grad_pos]

    def per_input(grads_out, needs):
        out = [None] * len(names)
        for i, g, need in zip(grad_pos, grads_out, needs):
            out[i] = g if need else None
        return tuple(out)

    def setup_context(ctx, inputs, output):
        keep(ctx, inputs, output if len(outputs) > 1 else (output,))

    def backward_rule(ctx, dy, *dstats):
        values, needs = unpack(ctx)
        return per_input(bwd_op(dy, *values, *needs), needs)

    torch.library.register_autograd(name, backward_rule, setup_context=setup_context)

    def fn_forward(ctx, *values):
        # the outputs after y are statistics for the backward, never differentiated: no zero gradients
        # of their size are built for them (attention_pool's are twice its output)
        ctx.set_materialize_grads(False)
        output, ctx.state = forward(**dict(zip(names, values)))
        keep(ctx, values, output if len(outputs) > 1 else (output,))
        return output

    @once_differentiable
    def fn_backward(ctx, dy, *dstats):
        values, needs = unpack(ctx)
        return per_input(run_backward((dy, *values, *needs), ctx.state), needs)

    # named for the kind (autograd shows "_<Kind>FnBackward"): "kvcompress::mean_pool_triton" -> _MeanPoolFn
    kind = name.split("::")[-1].rsplit("_", 1)[0]
    Function = type("_" + "".join(w.capitalize() for w in kind.split("_")) + "Fn", (torch.autograd.Function,), {
        "__doc__": f"{name}'s forward and backward without its dispatch, for eager calls (``eager_call``). "
                   "Same kernels, same results.",
        "__module__": forward.__module__,
        "forward": staticmethod(fn_forward), "backward": staticmethod(fn_backward)})

    def call(*values):
        if eager_call(values[0]):
            if torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in values):
                return Function.apply(*values)
            # nothing to differentiate: the forward itself, without the Function's context, saved tensors and
            # wrapper checks (about a fifth of a pool forward's host time on the CPU, launches stubbed)
            return forward(**dict(zip(names, values)))[0]
        return op(*values)

    call.op, call.function = op, Function
    call.__name__ = call.__qualname__ = kind
    return call
