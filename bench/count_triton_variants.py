"""Count the distinct Triton JIT variants a test run needs (what the GPU would compile).

A pytest plugin: under TRITON_INTERPRET=1 it records every launch of a ff_kernels Triton kernel and
the key Triton's JIT would compile it under on the GPU (constexpr values, the launch options, and
each runtime argument's specialisation as ``triton.runtime.jit`` computes it for an sm_90 target:
dtype, int == 1 / divisible by 16 / 64-bit, pointer alignment, None), then prints the count per
kernel. The interpreter's block configs and full-row width differ from the GPU's, and tests marked
``requires_cuda`` do not run here, so the numbers count the CPU-runnable matrix.

    TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider -p bench.count_triton_variants \\
        tests/test_triton_backend.py

``recording()`` is the same recorder as a context manager (tests/test_triton_backend.py uses it).
"""

from __future__ import annotations

import collections
import contextlib
import inspect

_OPTIONS = ("grid", "warmup", "num_warps", "num_stages", "num_ctas", "maxnreg", "ir_override")


def _make_recorder(run, keys, launches):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, native_specialize_impl

    backend = make_backend(GPUTarget("cuda", 90, 32))
    jitted = {}  # the JITFunction the GPU would use, for its parameters' specialisation flags

    def recording_run(self, *args, **kwargs):
        if self.fn.__module__.startswith("ff_kernels"):
            options = tuple((k, kwargs.get(k)) for k in ("num_warps", "num_stages"))
            call = {k: v for k, v in kwargs.items() if k not in _OPTIONS}
            bound = inspect.signature(self.fn).bind(*args, **call)
            if self.fn not in jitted:
                jitted[self.fn] = JITFunction(self.fn, **{k: v for k, v in self.kwargs.items()
                                                          if k.startswith("do_not_specialize")})
            key = []
            for param in jitted[self.fn].params:
                value = bound.arguments.get(param.name, param.default)
                if param.is_constexpr:
                    key.append((param.name, repr(value)))
                else:
                    key.append((param.name, native_specialize_impl(
                        backend, value, False, not param.do_not_specialize,
                        not param.do_not_specialize_on_alignment)))
            keys[self.fn.__name__].add((tuple(key), options))
            launches[self.fn.__name__] += 1
        return run(self, *args, **kwargs)

    return recording_run


@contextlib.contextmanager
def recording():
    """Yields {kernel name: set of GPU specialisation keys} of the launches inside the block."""
    from triton.runtime.interpreter import InterpretedFunction

    keys, launches = collections.defaultdict(set), collections.Counter()
    run = InterpretedFunction.run
    InterpretedFunction.run = _make_recorder(run, keys, launches)
    try:
        yield keys
    finally:
        InterpretedFunction.run = run


_KEYS = collections.defaultdict(set)
_LAUNCHES = collections.Counter()


def pytest_configure(config):
    from triton.runtime.interpreter import InterpretedFunction
    InterpretedFunction.run = _make_recorder(InterpretedFunction.run, _KEYS, _LAUNCHES)


def varying(keys):
    """{argument or option: the distinct specialisations it takes} over a kernel's keys, for the
    arguments that take more than one (what multiplies the variants)."""
    values = collections.defaultdict(set)
    for key, options in keys:
        for name, spec in key + options:
            values[name].add(str(spec))
    return {name: sorted(v) for name, v in values.items() if len(v) > 1}


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    tr.section("Triton JIT variants needed (GPU specialisation keys of the launches)")
    for name in sorted(_KEYS):
        tr.write_line(f"{name:<24} {len(_KEYS[name]):>4} variants  ({_LAUNCHES[name]} launches)")
        for arg, specs in varying(_KEYS[name]).items():
            tr.write_line(f"    {arg}: {' | '.join(specs)}")
    tr.write_line(f"{'total':<24} {sum(len(v) for v in _KEYS.values()):>4} variants")
