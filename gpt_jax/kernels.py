"""gpt_jax's CPU kernels in C++ (gpt_jax/csrc/cpu_kernels.cc), called through the XLA FFI: causal attention, LayerNorm.

XLA:CPU runs attention as many small batched matmuls, transposes and softmax passes; `causal_attention` does
one (sequence, head) pair at a time with its T x T block in cache, reading q, k, v straight from the (B, T, 3D)
input projection and writing (B, T, D) (see the source). It is float32, causal, without dropout on the
probabilities, for T and head sizes that are multiples of 8. `layer_norm` makes one pass over each row
forward and one backward where XLA makes several (float32, width a multiple of 8).

The first use compiles the source with the system C++ compiler (`$CXX`, else c++) into a cache folder
(`$GPT_JAX_CACHE_DIR`, else ~/.cache/gpt_jax), keyed by the source, the compiler, jaxlib and this CPU; later
processes load it. Without a compiler, or if the build fails, `available()` is False after one warning and
the model keeps its XLA path. Both functions have VJPs (jax.grad), batch under jax.vmap and compile under
jax.jit; like cuDNN's attention they have no forward-mode rule (jax.jvp), which is why the model uses them
only where asked (`cpu_kernels=True`: the train and eval steps).
"""

import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_kernels.cc"
TARGETS = ("GptJaxAttention", "GptJaxAttentionTrain", "GptJaxAttentionBwd", "GptJaxLayerNorm", "GptJaxLayerNormBwd")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
LAYER_NORM_BLOCKS = 64  # LayerNorm's backward sums its parameter gradients over this many fixed blocks of rows


def attention_supported(dtype, T: int, head_size: int) -> bool:
    """Whether `causal_attention` can run here: CPU backend, float32, T and head size multiples of 8."""
    return _on_cpu(dtype) and T % 8 == 0 and head_size % 8 == 0 and available()


def layer_norm_supported(dtype, width: int) -> bool:
    """Whether `layer_norm` can run here: CPU backend, float32, a width that is a multiple of 8."""
    return _on_cpu(dtype) and width % 8 == 0 and available()


def _on_cpu(dtype) -> bool:
    return jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32


def cache_dir() -> Path:
    """Where compiled kernels are kept: $GPT_JAX_CACHE_DIR, else $XDG_CACHE_HOME/gpt_jax or ~/.cache/gpt_jax."""
    if os.environ.get("GPT_JAX_CACHE_DIR"):
        return Path(os.environ["GPT_JAX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt_jax"


def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def _library_path(compiler: str) -> Path:
    """The cached library for this source, compiler, jaxlib and CPU (a -march=native build runs only there)."""
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, " ".join(FLAGS), importlib.metadata.version("jaxlib"),
                                    platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    return cache_dir() / f"cpu_kernels-{key}.so"


def build() -> Path:
    """Compile the kernels (or find them in the cache) and return the library's path; raises RuntimeError."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    path = _library_path(compiler)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:  # build beside the target, then rename: a concurrent or killed build never leaves a half-written library
        command = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
            raise RuntimeError(f"{Path(compiler).name} failed: {(errors or ['no output'])[0][:200]}")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


@functools.cache
def available() -> bool:
    """Build and register the kernels once per process; False (after one warning) where that fails."""
    import ctypes

    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
        for name in TARGETS:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"gpt_jax: the C++ CPU kernels are not available ({e}); attention and LayerNorm run as XLA "
                      f"ops (slower on CPU). Install a C++ compiler or set CXX to use them.", RuntimeWarning,
                      stacklevel=2)
        return False
    return True


def _call(target: str, results, *args, vmap_method: str = "broadcast_all", **attributes):
    """Call a kernel. Under jax.vmap, attention's inputs all carry the batch (the kernel takes any leading
    axes); LayerNorm's parameters may not, so its calls run once per vmapped element ("sequential")."""
    if not available():  # registers the targets on first use
        raise RuntimeError("gpt_jax's C++ CPU kernels are not available here (see the warning); "
                           "check *_supported() first")
    return jax.ffi.ffi_call(target, results, vmap_method=vmap_method)(*args, **attributes)


def _f32(*shape) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


# ---- causal attention ---------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def causal_attention(qkv_BT3D: jax.Array, n_head: int) -> jax.Array:
    """Causal softmax attention of the packed (..., T, 3D) projection [q | k | v] -> (..., T, D), float32.

    Each of q, k, v is D = H K wide with head h in columns h K .. (h+1) K, the layout of
    `qkv.reshape(..., T, 3 H, K)` split in three. `attention_supported` says whether it can run here.
    """
    *lead, T, C = qkv_BT3D.shape
    _check_attention(qkv_BT3D, n_head)
    return _call("GptJaxAttention", _f32(*lead, T, C // 3), qkv_BT3D, n_head=np.int64(n_head))


def _check_attention(qkv_BT3D, n_head: int) -> None:
    """The kernel reads raw memory: refuse, in one line, what it cannot take."""
    *_, T, C = qkv_BT3D.shape
    if qkv_BT3D.dtype != jnp.float32 or C % (3 * n_head) or T % 8 or (C // (3 * n_head)) % 8:
        raise ValueError(f"the C++ attention takes float32 (..., T, 3 H K) with T and K multiples of 8; got "
                         f"{qkv_BT3D.dtype} {qkv_BT3D.shape} with {n_head} heads (use model.causal_attention_xla)")


def _attention_forward(qkv_BT3D, n_head):
    *lead, T, C = qkv_BT3D.shape
    _check_attention(qkv_BT3D, n_head)
    y_BTD, probs_BHTT = _call("GptJaxAttentionTrain", (_f32(*lead, T, C // 3), _f32(*lead, n_head, T, T)), qkv_BT3D,
                              n_head=np.int64(n_head))
    return y_BTD, (qkv_BT3D, probs_BHTT)  # the probabilities are kept for the backward pass, as XLA's path keeps them


def _attention_backward(n_head, residuals, dy_BTD):
    qkv_BT3D, probs_BHTT = residuals
    return (_call("GptJaxAttentionBwd", _f32(*qkv_BT3D.shape), qkv_BT3D, probs_BHTT, dy_BTD, n_head=np.int64(n_head)),)


causal_attention.defvjp(_attention_forward, _attention_backward)


# ---- LayerNorm -----------------------------------------------------------------------------------------


def layer_norm(x_NXD: jax.Array, scale_D: jax.Array, bias_D: jax.Array | None = None, *, eps: float) -> jax.Array:
    """LayerNorm over the last axis in float32: (x - mean) / sqrt(var + eps) * scale (+ bias).

    `layer_norm_supported` says whether it can run here.
    """
    D = x_NXD.shape[-1]
    if x_NXD.dtype != jnp.float32 or D % 8 or scale_D.shape != (D,) or (bias_D is not None and bias_D.shape != (D,)):
        raise ValueError(f"the C++ LayerNorm takes float32 (..., D) with D a multiple of 8 and (D,) parameters; got "
                         f"{x_NXD.dtype} {x_NXD.shape} (use model.layer_norm_xla)")
    bias_D = jnp.zeros_like(scale_D) if bias_D is None else bias_D  # its gradient is then dropped
    return _layer_norm(x_NXD, scale_D, bias_D, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x_NXD, scale_D, bias_D, eps):
    return _layer_norm_forward(x_NXD, scale_D, bias_D, eps)[0]


def _layer_norm_forward(x_NXD, scale_D, bias_D, eps):
    rows = x_NXD.size // x_NXD.shape[-1]
    y, mean_N, rstd_N = _call("GptJaxLayerNorm", (_f32(*x_NXD.shape), _f32(rows), _f32(rows)), x_NXD, scale_D, bias_D,
                              vmap_method="sequential", eps=np.float32(eps))
    return y, (x_NXD, scale_D, mean_N, rstd_N)


def _layer_norm_backward(eps, residuals, dy_NXD):
    x_NXD, scale_D, mean_N, rstd_N = residuals
    D = x_NXD.shape[-1]
    blocks = min(x_NXD.size // D, LAYER_NORM_BLOCKS)
    dx, dscale_PD, dbias_PD = _call("GptJaxLayerNormBwd", (_f32(*x_NXD.shape), _f32(blocks, D), _f32(blocks, D)),
                                    x_NXD, scale_D, mean_N, rstd_N, dy_NXD, vmap_method="sequential")
    return dx, dscale_PD.sum(0), dbias_PD.sum(0)  # the blocks' partial sums of the parameter gradients


_layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)
