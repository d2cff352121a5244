"""Hugging Face ``transformers`` on fake tensors, taking the code paths of a real run.

``transformers`` asks ``is_tracing(tensor)`` (true for a ``FakeTensor``, through
``transformers.utils.import_utils.is_fake_tensor``) before it reads a tensor's values, and takes a
trace-safe path when it is: ``masking_utils`` then builds an explicit 4-D attention mask where a real run
finds the padding mask all ones and passes none to SDPA. On tiny models with an all-ones padding mask, in
fp32 (results/estimate-matrix.json): Llama, Qwen2, Gemma, Phi-3 +1.7-1.9%; Phi, GPT-NeoX, OPT +0.5-0.7%;
GPT-2, Falcon, BERT and a Mistral whose sliding window is shorter than the sequence use the same memory on
either path. The estimator answers such reads from its shadows (small real tensors beside the fake ones), so
it can let ``transformers`` believe no tensor is fake.

The check lives in ``import_utils``'s globals, which every caller reaches through ``is_tracing``; patching
that one name covers every model. ``transformers`` is often imported only by the model factory, under the
estimator: :class:`RealCodePaths` patches it when it is already imported, and :meth:`RealCodePaths.refresh`
(called after the model and the batch are built) patches it once it has been. Nothing imports
``transformers`` for a model that does not use it.

Limits: code that imported ``is_fake_tensor`` by name into its own module (no model in transformers 5.24
does) keeps the fake path; paths chosen by ``torch.compiler.is_compiling()`` or ``torch.jit.is_tracing()``
are the same under fake tensors as in a real run and need nothing.
"""

from __future__ import annotations

import sys

__all__ = ["RealCodePaths"]

_MODULE = "transformers.utils.import_utils"


def _never_fake(x) -> bool:
    return False


class RealCodePaths:
    """Context manager: while active, ``transformers`` treats fake tensors as real ones.

    ``bool(self)`` says whether ``transformers`` was patched at some point (the profile then says so)."""

    def __init__(self) -> None:
        self._module = None
        self._original = None
        self._active = False
        self.patched = False

    def __enter__(self) -> RealCodePaths:
        self._active = True
        self.refresh()
        return self

    def refresh(self) -> None:
        """Patch ``transformers`` if it has been imported since (no-op when patched or inactive)."""
        if not self._active or self._module is not None:
            return
        module = sys.modules.get(_MODULE)
        if module is None or not hasattr(module, "is_fake_tensor"):
            return
        self._module, self._original = module, module.is_fake_tensor
        module.is_fake_tensor = _never_fake
        self.patched = True

    def __exit__(self, *exc) -> None:
        self._active = False
        if self._module is not None:
            self._module.is_fake_tensor = self._original
            self._module = self._original = None

    def __bool__(self) -> bool:
        return self.patched
