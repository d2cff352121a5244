"""Running the user's code under the estimator's fake tensors as it runs for real.

Model factories and training steps do what user code does: ``model.to("cpu")``, ``.float()``, ``.half()``,
``.to(dtype)``, ``.cuda()``, PEFT's ``get_peft_model`` (which calls ``.to(device, dtype)``), and
``torch.compile(model)``. Under ``FakeTensorMode`` some of these fail or mean something else:

* ``Module._apply`` (behind ``.to``/``.float``/``.half``) must *swap* a fake parameter for its converted
  twin (``torch.utils.swap_tensors``: fake parameters always take that path), and the swap refuses tensors
  that have weak references, which the fake mode's own bookkeeping keeps on parameters ("_apply(): Couldn't
  swap Embedding.weight"). While the user's code runs, :func:`user_code` lets such a swap of two fake
  tensors fall back to exchanging their data (``.data =`` both ways), which is what ``_apply`` does for real
  tensors: the Parameter objects stay, with the new dtype or device.
* ``.cuda()`` / ``.to("cuda")`` / ``device="cuda"`` in the user's code, where the estimate's tensors live on
  the CPU (a CPU estimate, or CUDA emulated on the CPU kernels of a build without CUDA), are kept on the
  CPU: under :func:`user_code` a torch function mode rewrites CUDA devices to ``cpu``, so the moves cost
  what a move to the device already holding the tensor costs (nothing) and the estimate stays on one device.
* A ``torch.compile`` wrapper (``OptimizedModule``) is estimated as the module it wraps, eagerly: see
  :func:`unwrap_compiled`.

Everything is restored on exit: the user's global torch state is as before the estimate.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["user_code", "unwrap_compiled", "factory_notes"]


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


@contextlib.contextmanager
def _swap_by_data():
    """``torch.utils.swap_tensors`` on two fake tensors that weak references pin: exchange their data."""
    import torch.utils as tu

    original = tu.swap_tensors

    def swap_tensors(t1, t2):
        try:
            return original(t1, t2)
        except RuntimeError as e:
            if ("weakref" not in str(e) or not (_is_fake(t1) and _is_fake(t2))
                    or not torch._has_compatible_shallow_copy_type(t1, t2)
                    or t1.requires_grad != t2.requires_grad):
                raise
            with torch.no_grad():
                d1 = t1.detach()
                t1.data = t2.detach()
                t2.data = d1

    tu.swap_tensors = swap_tensors
    try:
        yield
    finally:
        tu.swap_tensors = original


def _is_cuda(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    return isinstance(d, str) and (d == "cuda" or d.startswith("cuda:"))


class _CudaStaysOnCpu(TorchFunctionMode):
    """Rewrites CUDA devices in torch calls to ``cpu`` (the estimate's device); counts how often."""

    def __init__(self) -> None:
        super().__init__()
        self.moves = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            self.moves += 1
            t = args[0]
            return t if t.device.type == "cpu" else t.to("cpu")
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            self.moves += 1
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and any(_is_cuda(a) for a in args[1:]):
            self.moves += 1
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def user_code(cuda_to_cpu: bool):
    """Run the user's factory or step under the estimator (see the module docstring); yields a dict whose
    ``"cuda_moves"`` counts the CUDA devices kept on the CPU."""
    seen = {"cuda_moves": 0}
    with contextlib.ExitStack() as stack:
        stack.enter_context(_swap_by_data())
        mode = stack.enter_context(_CudaStaysOnCpu()) if cuda_to_cpu else None
        try:
            yield seen
        finally:
            if mode is not None:
                seen["cuda_moves"] += mode.moves


def unwrap_compiled(model):
    """``(module, True)`` for a ``torch.compile`` wrapper (the module it compiles), else ``(model, False)``.

    Under a dispatch mode compiled code runs eagerly anyway; the estimate is of the eager step, which
    keeps what a compiled step's fusions might not (an upper bound there, not exact).
    """
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, torch.nn.Module) and type(model).__name__ == "OptimizedModule":
        return orig, True
    return model, False


def factory_notes(compiled: bool, *moves, device: str = "cpu") -> dict[str, str]:
    """The assumptions the user's code adds to an estimate: a compiled model estimated eagerly, CUDA moves
    kept on the estimate's device (``moves``: the :func:`user_code` counters, None for code not run)."""
    notes = {}
    if compiled:
        notes["compile"] = ("torch.compile wrapper estimated as the eager module it wraps (fusions that free "
                            "activations early are not modelled: an upper bound)")
    n = sum(m["cuda_moves"] for m in moves if m is not None)
    if n:
        notes["cuda_moves"] = (f"{n} tensor moves to CUDA (.cuda(), .to('cuda'), device='cuda') in the model's "
                               f"factory, batch or step kept on the estimate's device ({device})")
    return notes
